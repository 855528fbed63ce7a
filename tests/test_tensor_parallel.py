"""Tensor parallelism (trainer.parallel.tp) on CPU over gloo: tiny models, 2 to 4 ranks.

A TP run must report what one process reports: the same losses and gradient norms step by
step, checkpoints that resume under other meshes, and one line for a model that does not split.
"""

import json

import pytest

from bigmodel_cli.config import ParallelConfig, TrainerConfig
from bigmodel_cli.engine.distributed import DistEnv
from bigmodel_cli.engine.tensor_parallel import config_split_problem, sequence_parallel_problem
from bigmodel_cli.errors import UserError
from conftest import outcome_lines

# The tests that read the same trained runs (trained_once) run on one xdist worker.
SHARED_RUNS = pytest.mark.xdist_group("tensor_parallel_runs")


# Dropout off, per-step logging: runs compare step by step.
GPT = ("model=gpt", "data=text", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.dropout=0.0",
       "data.block_size=16", "trainer.max_steps=20", "trainer.log_every=1", "trainer.val_every=10",
       "trainer.eval_batches=2", "trainer.progress=plain", "trainer.threads=1", "trainer.device=cpu")
TP2 = ("trainer.devices=2", "trainer.parallel.tp=2")
TORCHRUN4 = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4")
MLP = ("model=mlp", "data=digits", "model.hidden_sizes=[32,16]", "model.dropout=0.0", "trainer.log_every=1",
       "trainer.val_every=6", "trainer.progress=plain", "trainer.threads=1", "trainer.device=cpu")


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir, key="loss"):
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


def assert_same_curve(got, expected, steps):
    assert sorted(got) == sorted(expected) and len(got) == steps, (got, expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}: {got[step]} vs {expected[step]}"


def trained(run_cli, tmp_path, name, *args):
    result = run_cli("train", *args, f"hydra.run.dir={name}", cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.output
    return tmp_path / name


# --------------------------------------------------------------- one line before launch


@pytest.mark.parametrize("model, tp, expect", [
    ({"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 3}, 2, "model.n_head=3 attention heads"),
    ({"_target_": "bigmodel_cli.models.transformer.TransformerEncoder", "n_heads": 4}, 3, "model.n_heads=4"),
    ({"_target_": "bigmodel_cli.models.mlp.MLP", "hidden_sizes": [33, 16]}, 2, "model.hidden_sizes[0]=33"),
    ({"_target_": "bigmodel_cli.models.cnn.CNN"}, 2, "CNN has no tensor-parallel plan"),
])
@pytest.mark.unit
def test_a_model_that_does_not_split_is_one_line_naming_a_setting_that_would(model, tp, expect):
    problem = config_split_problem(model, tp)
    assert problem and expect in problem and "\n" not in problem
    assert f"trainer.parallel.tp={tp}" in problem
    assert config_split_problem(model, 1) is None


@pytest.mark.unit
def test_splits_that_work_pass_and_suggestions_do_split():
    assert config_split_problem({"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 4}, 2) is None
    # Only the column-wise layers' widths are split: [32, 7] is fine for tp=2 (7 feeds the head row-wise).
    assert config_split_problem({"_target_": "bigmodel_cli.models.mlp.MLP", "hidden_sizes": [32, 7]}, 2) is None
    assert "model.n_head=4" in config_split_problem({"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 3}, 2)
    assert "trainer.parallel.tp=3" in config_split_problem({"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 6}, 4)
    # The suggested head count also divides the width, or none is suggested (gpt2: 768 wide, tp=5).
    gpt = {"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 12, "n_embd": 768}
    assert "model.n_head=8)" in config_split_problem(gpt, 8)
    assert config_split_problem(gpt, 5).endswith("use trainer.parallel.tp=4")


@pytest.mark.unit
def test_several_replicas_of_a_split_model_pass_the_checks_under_either_strategy():
    from bigmodel_cli.engine.layout_checks import check_layout

    gpt = {"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 4}
    for strategy in ("ddp", "fsdp"):
        check_layout(TrainerConfig(devices=4, strategy=strategy, parallel=ParallelConfig(tp=2)), DistEnv(), gpt)
        check_layout(TrainerConfig(devices=8, strategy=strategy, parallel=ParallelConfig(tp=2, pp=2)), DistEnv(), gpt)


@pytest.mark.unit
def test_fp16_under_tp_is_refused_before_launch():
    """GradScaler decides on each rank's own gradient shards: an overflow in one would skip the
    step there only. (fsdp and pp refuse fp16 for the same reason.)"""
    from bigmodel_cli.engine.layout_checks import check_layout

    gpt = {"_target_": "bigmodel_cli.models.gpt.GPT", "n_head": 4}
    with pytest.raises(UserError, match="use trainer.precision=bf16"):
        check_layout(TrainerConfig(devices=2, precision="fp16", parallel=ParallelConfig(tp=2)), DistEnv(), gpt)
    check_layout(TrainerConfig(devices=2, precision="bf16", parallel=ParallelConfig(tp=2)), DistEnv(), gpt)


@pytest.mark.unit
def test_sequence_parallel_asked_for_with_dropout_off_cuda_is_refused_before_launch():
    """On CPU, DTensor draws a sharded dropout from each rank's own generator: every tp rank
    would mask its part of the sequence alike. Asked for by name, that is one line naming the
    ways out; left at null, it is simply not used there."""
    from bigmodel_cli.engine.layout_checks import check_layout

    encoder = {"_target_": "bigmodel_cli.models.transformer.TransformerEncoder", "n_heads": 2, "dropout": 0.1}
    asked = TrainerConfig(devices=2, device="cpu", parallel=ParallelConfig(tp=2, sequence_parallel=True))
    with pytest.raises(UserError, match="trainer.parallel.sequence_parallel=null") as refused:
        check_layout(asked, DistEnv(), encoder)
    assert "model.dropout=0.1" in str(refused.value) and "\n" not in str(refused.value)
    check_layout(asked, DistEnv(), {**encoder, "dropout": 0.0})
    check_layout(TrainerConfig(devices=2, device="cpu", parallel=ParallelConfig(tp=2)), DistEnv(), encoder)
    check_layout(TrainerConfig(devices=2, device="cpu"), DistEnv(), encoder)  # no tp: no sequence shards
    assert sequence_parallel_problem(encoder, 2, True, "cuda") is None


@pytest.mark.unit
def test_sequence_parallel_by_default_where_it_is_exact():
    from bigmodel_cli.engine.tensor_parallel import use_sequence_parallel
    from bigmodel_cli.models.gpt import GPT
    from bigmodel_cli.models.mlp import MLP

    plain, dropping = GPT(vocab_size=11, block_size=8, n_layer=1), GPT(vocab_size=11, block_size=8, n_layer=1, dropout=0.1)
    assert use_sequence_parallel(None, plain, "cpu", 2) and use_sequence_parallel(None, dropping, "cuda", 2)
    assert not use_sequence_parallel(None, dropping, "cpu", 2)
    assert not use_sequence_parallel(True, MLP(input_shape=(4,), num_outputs=2, hidden_sizes=[4]), "cuda", 2)
    assert not use_sequence_parallel(False, plain, "cuda", 2)


@pytest.mark.dist
def test_heads_not_divisible_fails_before_any_worker_starts(run_cli):
    result = run_cli("train", *GPT, "model.n_head=1", "trainer.devices=2", "trainer.parallel.tp=2", timeout=120)
    assert result.returncode != 0
    lines = outcome_lines(result.stderr)
    assert len(lines) == 1 and "model.n_head=1 attention heads do not split" in lines[0], result.output
    assert "Traceback" not in result.stderr and "worker" not in result.stderr.lower()


@pytest.mark.parametrize("overrides, expect", [
    (("model=cnn", "trainer.devices=2", "trainer.parallel.tp=2"), "CNN has no tensor-parallel plan"),
    (("model=gpt", "data=text", "model.n_head=3", "model.n_embd=24", "trainer.devices=2", "trainer.parallel.tp=2"),
     "model.n_head=3 attention heads do not split"),
    (("model=gpt", "data=text", "model.n_layer=1", "trainer.devices=2", "trainer.parallel.pp=2"),
     "too few to cut into 2 stages"),
    (("model=transformer", "trainer.device=cpu", "trainer.devices=2", "trainer.parallel.tp=2",
      "trainer.parallel.sequence_parallel=true"),
     "the same dropout mask for its part of the sequence"),
])
@pytest.mark.unit
def test_plan_and_dry_run_refuse_what_train_refuses_before_launch(overrides, expect):
    """`bigmodel plan` (and trainer.dry_run=true) must not plan, with a launch line, a run that fails."""
    from bigmodel_cli.plan.show import show_plan
    from conftest import compose_config

    cfg = compose_config(*overrides)
    with pytest.raises(UserError, match=expect):
        show_plan(cfg, {"model": overrides[0].split("=")[1]}, list(overrides))


@pytest.mark.unit
def test_lr_find_runs_a_split_model_whole_with_the_global_batch_of_its_replicas():
    """lr-find is one process: tp x pp ranks compute one replica's numbers, so only the
    data-parallel replicas become accumulation (tp=2 on 2 ranks is 1 replica, not 2)."""
    from bigmodel_cli.commands.lr_find import probe_config, refuse_what_train_refuses
    from bigmodel_cli.config import LrFindConfig
    from conftest import compose_config

    for devices, tp, accum in ((2, 2, 1), (4, 2, 2)):
        cfg = compose_config("model=gpt", "data=text", f"trainer.devices={devices}", f"trainer.parallel.tp={tp}",
                             "trainer.strategy=fsdp")
        probe = probe_config(cfg, LrFindConfig())
        assert (probe.trainer.grad_accum_steps, probe.trainer.parallel.tp, probe.trainer.devices) == (accum, 1, 1)
    with pytest.raises(UserError, match="CNN has no tensor-parallel plan"):
        refuse_what_train_refuses(compose_config("model=cnn", "trainer.devices=2", "trainer.parallel.tp=2"))


# --------------------------------------------------------------- the same numbers as one process


@pytest.mark.dist
def test_gpt_under_tp2_follows_one_process_and_its_checkpoint_resumes_anywhere(run_cli, tmp_path):
    """tp=2, with sequence parallelism (the default) and activation checkpointing, matches one
    process step by step (loss and the global gradient norm, clipped: the norms' weights are
    replicated DTensors); its sharded step-10 checkpoint resumes in one process with the
    uninterrupted run's next losses, and evaluates in one process."""
    args = (*GPT, "data.batch_size=8", "trainer.checkpoint_every=10")
    single = trained(run_cli, tmp_path, "single", *args)
    # Blocks that recompute their activations in the backward pass: the same numbers.
    recompute = "model.activation_checkpointing=true"
    tp = trained(run_cli, tmp_path, "tp", *args, "trainer.devices=2", "trainer.parallel.tp=2", recompute)
    assert_same_curve(curve(tp), curve(single), 20)
    assert_same_curve(curve(tp, "grad_norm"), curve(single, "grad_norm"), 20)
    shards = tp / "checkpoints" / "step_00000010.dcp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in shards.iterdir()}
    assert "parallel layout: dp=1 x tp=2 x pp=1 (2 ranks)" in (tp / "train_rank1.log").read_text()
    assert "rank 1 is at pp=0 dp=0 tp=1" in (tp / "train_rank1.log").read_text()
    assert "sequence parallelism: the blocks' norms" in (tp / "train_rank1.log").read_text()
    resumed = trained(run_cli, tmp_path, "resumed_single", *args, recompute, f"trainer.resume={shards}")
    expected = {s: v for s, v in curve(single).items() if s > 10}
    assert_same_curve(curve(resumed), expected, 10)
    evaluated = run_cli("eval", f"ckpt={tp}", "eval_batches=2", cwd=tmp_path)  # as the run's own test
    assert evaluated.returncode == 0, evaluated.output
    report = json.loads((evaluated.run_dir("eval") / "eval.json").read_text())
    assert report["metrics"]["loss"] == pytest.approx(json.loads((tp / "summary.json").read_text())["test"]["loss"],
                                                      rel=1e-5)


@pytest.mark.dist
@SHARED_RUNS
def test_a_tp2_checkpoint_resumes_under_two_data_parallel_ranks(trained_once, run_cli, tmp_path):
    """Saved under tp=2 (one replica, batch 16), resumed under dp=2 (two replicas of batch 8).
    Digits' sampler shards one permutation, so both read the same samples each step: the
    resumed run continues with the uninterrupted run's losses."""
    tp = trained_once(*SPLIT_ARGS["mlp"], *TP2)  # the run test_mlp_and_transformer_under_tp2... compares
    shards = tp / "checkpoints" / "step_00000006.dcp"
    args = [a for a in SPLIT_ARGS["mlp"] if not a.startswith("data.batch_size=")]
    dp = trained(run_cli, tmp_path, "dp", *args, "data.batch_size=8", "trainer.devices=2",
                 f"trainer.resume={shards}")
    assert_same_curve(curve(dp), {s: v for s, v in curve(tp).items() if s > 6}, 6)


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
@SHARED_RUNS
def test_tp_within_two_replicas_on_four_ranks_follows_the_two_replicas(trained_once, strategy):
    """dp=2 x tp=2 reads the same data shares as plain DDP on 2 ranks: the same curve. Under
    fsdp each replica is sharded (2-D DTensors); under ddp the trainer averages the replicas'
    shards."""
    args = (*GPT, "data.batch_size=4", "trainer.max_steps=12", "trainer.grad_accum_steps=2")
    replicas = trained_once(*args, "trainer.devices=2")
    # Four ranks through torchrun (our launcher keeps to one process per CPU core).
    both = trained_once(*args, f"trainer.strategy={strategy}", "trainer.parallel.tp=2", launcher=TORCHRUN4)
    assert_same_curve(curve(both), curve(replicas), 12)
    assert_same_curve(curve(both, "grad_norm"), curve(replicas, "grad_norm"), 12)
    assert {"__0_0.distcp", "__3_0.distcp"} <= {p.name for p in (both / "checkpoints" / "last.dcp").iterdir()}

TRANSFORMER = ("model=transformer", "data=digits", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
               "model.dropout=0.0")


# Sequence parallelism on 9 tokens (8 rows and the class token): shards of 5 and 4; one
# block is both the first and the last.
SPLIT_MODELS = {"mlp": ("model=mlp", "data=digits", "model.hidden_sizes=[32,16]", "model.dropout=0.0",
                        "trainer.checkpoint_every=6"),
                "transformer": TRANSFORMER,
                "transformer-without-sp": (*TRANSFORMER, "trainer.parallel.sequence_parallel=false")}
SPLIT_ARGS = {name: (*model, "data.batch_size=16", "trainer.max_steps=12", "trainer.log_every=1",
                     "trainer.val_every=12", "trainer.progress=plain", "trainer.threads=1", "trainer.device=cpu")
              for name, model in SPLIT_MODELS.items()}


@pytest.mark.parametrize("model", SPLIT_ARGS)
@pytest.mark.dist
@SHARED_RUNS
def test_mlp_and_transformer_under_tp2_follow_one_process(trained_once, model):
    args = SPLIT_ARGS[model]
    # One process: sequence parallelism is a tp setting only, so both transformers share it.
    single = trained_once(*(a for a in args if not a.startswith("trainer.parallel.")))
    tp = trained_once(*args, *TP2)
    assert_same_curve(curve(tp), curve(single), 12)
    assert_same_curve(curve(tp, "val/loss"), curve(single, "val/loss"), 2)  # at start and at the end
    assert_same_curve(curve(tp, "grad_norm"), curve(single, "grad_norm"), 12)
