"""Pipeline parallelism (trainer.parallel.pp) on CPU over gloo: a tiny GPT cut into stages
follows one process's loss curve, its sharded checkpoints resume and load in one process,
and what cannot be pipelined is one line before launch."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from bigmodel_cli.config import ParallelConfig, TrainerConfig
from bigmodel_cli.engine.pipeline import check_config, cut, stage_blocks
from bigmodel_cli.errors import UserError
from bigmodel_cli.models.gpt import GPT
from conftest import CLIResult, bigmodel, cli_env

# Its module-scoped trained runs are made once: every test of the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("pipeline_parallel")


# Dropout off and per-step logging, so runs compare step by step; checkpoints at steps MID and
# STEPS; evaluations capped (each batch through the stages is a round of messages between ranks).
STEPS, MID = 8, 4
TINY_GPT = ("model=gpt", "data=text", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.dropout=0.0",
            "data.block_size=32", "data.batch_size=8", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
            f"trainer.val_every={MID}", "trainer.eval_batches=4", "trainer.progress=plain", "trainer.threads=1")
PP2 = ("trainer.devices=2", "trainer.parallel.pp=2")
TORCHRUN4 = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4")


def cli(*args, cwd, launcher=()):
    """`bigmodel ARGS` (in this process where no worker is launched), or under `launcher`."""
    env = {"CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU machine
    if not launcher:
        return bigmodel(*args, cwd=cwd, env=env, timeout=600)
    cmd = [sys.executable, *launcher, "-m", "bigmodel_cli", *args]
    return CLIResult(subprocess.run(cmd, cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=600), cwd)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """Training runs by name, each run once per module (several tests read the same run)."""
    done = {}

    def run(name, *args, launcher=()):
        if name not in done:
            result = cli("train", *args, "hydra.run.dir=run", cwd=tmp_path_factory.mktemp(name), launcher=launcher)
            assert result.returncode == 0, result.output
            done[name] = result
        return done[name]

    return run


def run_dir(result):
    return result.cwd / "run"


def records(result):
    return [json.loads(line) for line in (run_dir(result) / "metrics.jsonl").read_text().splitlines()]


def losses(result):
    return {r["step"]: r["loss"] for r in records(result) if "loss" in r and "lr" in r}


def evaluations(result):
    return [{k: v for k, v in r.items() if "/" in k} for r in records(result) if any("/" in k for k in r)]


def grad_norms(result):
    return {r["step"]: r["grad_norm"] for r in records(result) if "grad_norm" in r}


def assert_same_curve(expected, got, rel=1e-5, curve=losses):
    a, b = curve(expected), curve(got)
    assert b and set(b) <= set(a)
    for step in sorted(b):
        assert b[step] == pytest.approx(a[step], rel=rel), f"step {step}: {a[step]} vs {b[step]}"


def checkpoint(result, step):
    return run_dir(result) / "checkpoints" / f"step_{step:08d}.dcp"


# ---------------------------------------------------------------- the cut (one process)


@pytest.mark.unit
def test_stage_blocks_are_as_even_as_can_be():
    assert stage_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_blocks(4, 4) == [range(i, i + 1) for i in range(4)]


@pytest.mark.unit
@pytest.mark.parametrize("schedule,owned", [("1f1b", ([0, 1], [2, 3])), ("interleaved_1f1b", ([0, 2], [1, 3]))])
def test_the_stages_together_hold_the_whole_model_under_its_own_keys(schedule, owned):
    torch.manual_seed(0)
    full = GPT(vocab_size=11, block_size=8, n_layer=4, n_head=2, n_embd=16)
    whole = full.state_dict()
    parallel = ParallelConfig(pp=2, schedule=schedule)
    parts = [copy.deepcopy(full) for _ in range(2)]
    cuts = [cut(model, parallel, rank) for rank, model in enumerate(parts)]
    first, last = (model.state_dict() for model in parts)
    assert set(first) | set(last) == set(whole)
    for state in (first, last):
        for key, tensor in state.items():
            assert torch.equal(tensor, whole[key]), key
    for rank, model in enumerate(parts):
        blocks = {int(k.split(".")[1]) for k in model.state_dict() if k.startswith("blocks.")}
        assert sorted(blocks) == owned[rank]
    assert "pos_emb.weight" in first and "lm_head.weight" not in first and "ln_f.weight" not in first
    assert "pos_emb.weight" not in last and "lm_head.weight" in last
    # The tied embedding / head lives on both ends; each knows its own name for it.
    assert cuts[0].shared == {"tok_emb.weight": (0, 1)} and cuts[1].shared == {"lm_head.weight": (0, 1)}
    x = torch.randint(0, 11, (3, 8))
    h = x
    for stage in sorted((s for c in cuts for s in c.stages), key=lambda s: s.index):
        h = stage(h)
    assert torch.allclose(h, full(x), atol=1e-6)  # the stages in order compute the whole model


def settings(**parallel):
    return TrainerConfig(parallel=ParallelConfig(**{"pp": 2, **parallel}))


GPT_CFG = {"_target_": "bigmodel_cli.models.gpt.GPT", "n_layer": 4}


@pytest.mark.parametrize("model_cfg,batch,config,message", [
    ({**GPT_CFG, "n_layer": 1}, 8, settings(), r"the model has 1 block, too few to cut into 2 stages; use "
                                               r"trainer.parallel.pp=1.*model.n_layer=2 or more"),
    ({**GPT_CFG, "n_layer": 3}, 8, settings(schedule="interleaved_1f1b"),
     r"3 blocks, too few to cut into 2 ranks x 2 stages each.*schedule=1f1b"),
    ({"_target_": "bigmodel_cli.models.mlp.MLP"}, 8, settings(), r"MLP has no stage plan.*trainer.parallel.pp=1"),
    ({"_target_": "bigmodel_cli.models.rnn.RNN"}, 8, settings(), r"RNN has no stage plan"),
    (GPT_CFG, 6, settings(microbatches=4), r"data.batch_size=6 does not split into trainer.parallel.microbatches=4"),
    (GPT_CFG, 8, settings(microbatches=1), r"1f1b needs at least as many micro-batches as stages"),
    (GPT_CFG, 8, TrainerConfig(precision="fp16", parallel=ParallelConfig(pp=2)), r"use trainer.precision=bf16"),
])
@pytest.mark.unit
def test_what_cannot_be_pipelined_is_one_line(model_cfg, batch, config, message):
    with pytest.raises(UserError, match=message) as err:
        check_config(model_cfg, batch, config)
    assert "\n" not in str(err.value)


@pytest.mark.dist
def test_too_few_blocks_fail_before_launch(tmp_path):
    result = cli("train", *TINY_GPT, *PP2, "model.n_layer=1", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the model has 1 block, too few to cut into 2 stages; use trainer.parallel.pp=1, "
                      "or model.n_layer=2 or more"], result.output
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- end to end


@pytest.mark.dist
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_follow_the_single_process_curve(train, schedule):
    single = train("single", *TINY_GPT)
    staged = train(schedule, *TINY_GPT, *PP2, f"trainer.parallel.schedule={schedule}")
    assert len(losses(staged)) == STEPS
    assert_same_curve(single, staged)
    # Evaluation runs through the stages and gives one process's numbers (val and the final test).
    for ours, theirs in zip(evaluations(single), evaluations(staged), strict=True):
        assert theirs == pytest.approx(ours, rel=1e-5)
    names = {p.name for p in checkpoint(staged, STEPS).iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= names  # each stage wrote its own
    assert "pipeline: 2 stages" in (run_dir(staged) / "train_rank1.log").read_text()


@pytest.mark.e2e
def test_a_pipeline_checkpoint_resumes_in_one_process(train, tmp_path):
    single = train("single", *TINY_GPT)
    staged = train("1f1b", *TINY_GPT, *PP2, "trainer.parallel.schedule=1f1b")
    resumed = cli("train", *TINY_GPT, f"trainer.resume={checkpoint(staged, MID)}", "hydra.run.dir=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.output
    assert sorted(losses(resumed)) == list(range(MID + 1, STEPS + 1))
    assert_same_curve(single, resumed)


@pytest.mark.e2e
def test_a_pipeline_checkpoint_evaluates_and_generates_in_one_process(train, tmp_path):
    single = train("single", *TINY_GPT)
    staged = train("1f1b", *TINY_GPT, *PP2, "trainer.parallel.schedule=1f1b")
    evaluated = cli("eval", f"ckpt={run_dir(staged)}", "eval_batches=4", cwd=tmp_path)  # as in training
    assert evaluated.returncode == 0, evaluated.output
    report = json.loads((evaluated.run_dir("eval") / "eval.json").read_text())
    assert report["checkpoint"].endswith("best.dcp")
    assert report["metrics"]["loss"] == pytest.approx(evaluations(single)[-1]["test/loss"], rel=1e-5)
    # Greedy sampling from the pipeline's weights writes what one process's weights write.
    greedy = ("prompt=The ", "max_new_tokens=30", "top_k=1")
    ours = cli("generate", f"ckpt={run_dir(staged)}", *greedy, cwd=tmp_path)
    theirs = cli("generate", f"ckpt={run_dir(single)}", *greedy, cwd=tmp_path)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.output + theirs.output
    assert ours.stdout.strip() and ours.stdout == theirs.stdout


@pytest.mark.dist
def test_interleaved_stages_follow_the_single_process_curve(train):
    four_blocks = (*TINY_GPT, "model.n_layer=4")
    single = train("single4", *four_blocks)
    staged = train("interleaved", *four_blocks, *PP2, "trainer.parallel.schedule=interleaved_1f1b")
    assert "pipeline: 4 stages (0: blocks 0-0, 2: blocks 2-2 here)" in (run_dir(staged) / "train_rank0.log").read_text()
    assert_same_curve(single, staged)


@pytest.mark.dist
def test_a_pipeline_resumes_bit_for_bit(train, tmp_path):
    staged = train("1f1b", *TINY_GPT, *PP2, "trainer.parallel.schedule=1f1b")
    resumed = cli("train", *TINY_GPT, *PP2, "trainer.parallel.schedule=1f1b",
                  f"trainer.resume={checkpoint(staged, MID)}", "hydra.run.dir=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.output
    ours = {r["step"]: r for r in records(resumed) if "loss" in r}
    theirs = {r["step"]: r for r in records(staged) if "loss" in r}
    assert sorted(ours) == list(range(MID + 1, STEPS + 1))
    assert all((ours[s]["loss"], ours[s]["grad_norm"]) == (theirs[s]["loss"], theirs[s]["grad_norm"]) for s in ours)


@pytest.mark.dist
def test_two_replicas_of_two_stages_follow_data_parallel(train):
    """pp=2 x dp=2 (4 ranks, under torchrun) with accumulation and clipping == plain DDP on 2."""
    extra = ("trainer.grad_accum_steps=2", "trainer.grad_clip=0.5")
    ddp = train("ddp", *TINY_GPT, *extra, "trainer.devices=2")
    both = train("pp_dp", *TINY_GPT, *extra, "trainer.parallel.pp=2", launcher=TORCHRUN4)
    assert "batch 8 per replica x 2 replicas" in both.stderr
    assert_same_curve(ddp, both)
    for ours, theirs in zip(evaluations(ddp), evaluations(both), strict=True):
        assert theirs == pytest.approx(ours, rel=1e-5)


@pytest.mark.dist
def test_tensor_parallel_stages_follow_the_single_process_curve(train):
    """tp=2 x pp=2 on 4 ranks (torchrun): each stage's blocks are split over two ranks, with
    sequence parallelism (on by default without dropout): activations leave each stage whole."""
    single = train("single", *TINY_GPT)
    both = train("tp_pp", *TINY_GPT, "trainer.parallel.pp=2", "trainer.parallel.tp=2", launcher=TORCHRUN4)
    log = (run_dir(both) / "train_rank3.log").read_text()
    assert "dp=1 x tp=2 x pp=2 (4 ranks)" in log and "sequence parallelism: the blocks' norms" in log
    assert_same_curve(single, both)
    assert_same_curve(single, both, curve=grad_norms)


@pytest.mark.dist
def test_fsdp_shards_each_stage_over_its_replicas(train, tmp_path):
    """pp=2 x dp=2 under fsdp (4 ranks) with accumulation and clipping == plain DDP on 2, the
    tied embedding and head included; its checkpoint resumes under DDP."""
    extra = ("trainer.grad_accum_steps=2", "trainer.grad_clip=0.5")
    ddp = train("ddp", *TINY_GPT, *extra, "trainer.devices=2")
    sharded = train("pp_fsdp", *TINY_GPT, *extra, "trainer.parallel.pp=2", "trainer.strategy=fsdp", launcher=TORCHRUN4)
    assert "stage 1 sharded over 2 data-parallel ranks (fsdp)" in (run_dir(sharded) / "train_rank3.log").read_text()
    assert_same_curve(ddp, sharded)
    assert_same_curve(ddp, sharded, curve=grad_norms)
    resumed = cli("train", *TINY_GPT, *extra, "trainer.devices=2", f"trainer.resume={checkpoint(sharded, MID)}",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.output
    assert sorted(losses(resumed)) == list(range(MID + 1, STEPS + 1))
    assert_same_curve(ddp, resumed)


@pytest.mark.unit
def test_the_last_stage_resumes_the_tied_head_from_an_unsplit_runs_optimizer_state(tmp_path):
    """A tp or fsdp checkpoint keeps GPT's tied embedding/head state under tok_emb.weight; the
    last stage knows it as lm_head.weight and must still find it (one process, DCP without ranks)."""
    from types import SimpleNamespace

    from bigmodel_cli.engine.checkpoint import load_model_and_optimizer
    from bigmodel_cli.engine.sharded import save_sharded

    torch.manual_seed(0)
    full = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    optimizer = torch.optim.AdamW(full.parameters(), lr=0.1)
    full(torch.randint(0, 11, (2, 8))).sum().backward()
    optimizer.step()
    save_sharded({"step": 1}, full, optimizer, tmp_path / "step.dcp")
    last = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    cut(last, ParallelConfig(pp=2), 1)
    resumed = torch.optim.AdamW(last.parameters(), lr=0.1)
    load_model_and_optimizer(last, resumed, SimpleNamespace(is_sharded=True, sharded_dir=tmp_path / "step.dcp"))
    head = resumed.state[last.lm_head.weight]
    assert torch.equal(last.lm_head.weight, full.lm_head.weight)
    assert torch.equal(head["exp_avg"], optimizer.state[full.tok_emb.weight]["exp_avg"])


@pytest.mark.unit
def test_a_model_that_describes_stages_without_their_methods_is_one_line():
    from bigmodel_cli.engine.pipeline import plan_for
    from bigmodel_cli.models.description import PipelineStages

    class HalfDescribed:
        pipeline_stages = PipelineStages("layers", ("embed",), ("head",), "depth")

    with pytest.raises(UserError, match=r"HalfDescribed describes pipeline stages but has no stage_input or "
                                        r"stage_output method.*trainer.parallel.pp=1"):
        plan_for(HalfDescribed, "HalfDescribed")
