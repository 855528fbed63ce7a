"""End-to-end: the `bigmodel` command as a user runs it, in a subprocess."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf


QUICK = ("trainer.max_steps=6", "trainer.log_every=3", "trainer.val_every=3", "trainer.eval_batches=4")

# Every model with each data set it can read.
PAIRS = [
    ("mlp", "digits"), ("mlp", "synthetic"), ("mlp", "sine"),
    ("cnn", "digits"), ("cnn", "synthetic data.input_shape=[3,8,8]"),
    ("rnn", "digits"), ("rnn", "sine"), ("rnn", "synthetic model.cell=gru data.input_shape=[6,4]"),
    ("rnn", "sine model.cell=rnn"),
    ("transformer", "digits"), ("transformer", "sine model.positional=sinusoidal"),
    ("transformer", "synthetic data.input_shape=[5,4]"),
    ("transformer", "digits model.patch_size=4"),
    ("gpt", "text"),
]


@pytest.mark.e2e
def test_top_level_help_is_fast_and_lists_commands():
    """Fast because it imports neither torch nor Hydra (bench/RESULTS.md has the time)."""
    proc = subprocess.run([sys.executable, "-m", "bigmodel_cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "train" in proc.stdout and "eval" in proc.stdout
    probe = "import sys, bigmodel_cli.cli as c; c.main(['--help']); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.integration
def test_bare_command_prints_usage(run_cli):
    result = run_cli()
    assert result.returncode == 0 and "Commands:" in result.stdout


@pytest.mark.integration
def test_unknown_command_suggests(run_cli):
    result = run_cli("trian")
    assert result.returncode == 2 and "did you mean 'train'" in result.stderr


@pytest.mark.e2e
def test_train_help_lists_groups_and_skips_torch(run_cli):
    result = run_cli("train", "--help")
    assert result.returncode == 0
    assert "Config groups" in result.stdout and "  model " in result.stdout and "[mlp]" in result.stdout
    cfg = run_cli("train", "--cfg", "job", "model=cnn")
    assert cfg.returncode == 0 and "bigmodel_cli.models.cnn.CNN" in cfg.stdout
    probe = ("import sys\nfrom bigmodel_cli.cli import main\n"
             "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
             "sys.exit(3 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.integration
@pytest.mark.parametrize("model,data", PAIRS, ids=[f"{m}-{d.split()[0]}" for m, d in PAIRS])
def test_every_model_with_its_data(run_cli, model, data):
    result = run_cli("train", f"model={model}", *f"data={data}".split(), *QUICK)
    assert result.returncode == 0, result.output
    summary = result.summary()
    assert summary["steps"] == 6
    assert summary["test"]["loss"] == summary["test"]["loss"]  # not NaN
    run_dir = result.run_dir()
    for name in ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert "parameters" in result.stderr  # the model reports its size at start


@pytest.mark.integration
def test_train_then_eval(run_cli):
    trained = run_cli("train", "model=gpt", "data=text", *QUICK)
    assert trained.returncode == 0, trained.output
    run_dir = trained.run_dir()
    assert json.loads((run_dir / "vocab.json").read_text())
    evaluated = run_cli("eval", f"ckpt={run_dir}", "split=val")
    assert evaluated.returncode == 0, evaluated.output
    assert "perplexity" in evaluated.stdout
    report = json.loads((evaluated.run_dir("eval") / "eval.json").read_text())
    assert report["split"] == "val" and report["checkpoint"].endswith("best.pt")
    best_val = min(json.loads(l)["val/loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "val/loss" in l and json.loads(l)["step"] > 0)
    # eval.json covers the whole split; training evaluated only 4 batches, so compare loosely.
    assert abs(report["metrics"]["loss"] - best_val) < 0.5
    # The same checkpoint file, explicit path, test split, overridden batch size.
    again = run_cli("eval", f"ckpt={run_dir}/checkpoints/last.pt", "+data.batch_size=5")
    assert again.returncode == 0, again.output


@pytest.mark.integration
def test_eval_matches_training_test_metric(run_cli):
    trained = run_cli("train", "model=mlp", "trainer.max_steps=20", "trainer.val_every=10")
    assert trained.returncode == 0, trained.output
    evaluated = run_cli("eval", f"ckpt={trained.run_dir()}")
    report = json.loads((evaluated.run_dir("eval") / "eval.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(trained.summary()["test"]["accuracy"])


@pytest.mark.integration
def test_multirun_sweep_over_two_learning_rates(run_cli):
    result = run_cli("train", "-m", "optim.lr=1e-3,1e-2", "trainer.max_steps=20")
    assert result.returncode == 0, result.output
    sweeps = list((result.cwd / "outputs").glob("*/*_train_multirun"))
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        records = [json.loads(l) for l in (job / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in records)
        lrs.append(OmegaConf.load(job / "config.yaml").optim.lr)
    assert lrs == [1e-3, 1e-2]


# These errors are about a machine without a GPU; on a GPU machine the same input is valid.
WITHOUT_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
BAD_INPUTS = [
    (["model=nonexistent"], "unknown model 'nonexistent'"),
    (["trainer.max_stepz=5"], "max_stepz"),
    (["trainer.max_steps=abc"], "could not be converted"),
    (["optim.lr=-0.1"], "optim.lr must be > 0"),
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["data.batch_size=0"], "data.batch_size must be > 0"),
    (["data.batch_size=-8"], "data.batch_size must be > 0"),
    (["data=text", "data.path=/no/such/file.txt"], "does not exist"),
    (["model=gpt"], "cannot train on data=digits"),
    (["model=cnn", "data=text"], "cannot train on data=text"),
    pytest.param(["trainer.device=cuda"], "no CUDA device", marks=WITHOUT_GPU),
    pytest.param(["trainer.device=cuda:7"], "CUDA",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="cuda:7 exists here")),
    (["trainer.device=tpu"], "trainer.device=tpu"),
    pytest.param(["trainer.precision=fp16"], "fp16 needs a CUDA GPU", marks=WITHOUT_GPU),
    (["model=custom", "model._target_=no.such.Net"], "cannot be imported"),
    (["trainer.monitor=val/auc"], "not a validation metric"),
    (["data=synthetic", "data.num_samples=-5"], "data.num_samples must be > 0"),
    (["model=gpt", "data=text", "data.block_size=0"], "data.block_size must be > 0"),
    (["data=text", "data.path="], "data.path is empty"),
    (["optim=adam", "optim.betas=[0.9]"], "rejected its settings"),
    (["optim=momentum", "optim.nesterov=true", "optim.momentum=0"], "rejected its settings"),
    (["scheduler=exponential", "scheduler.gamma=-1"], "scheduler.gamma must be > 0"),
    (["scheduler.min_lr_ratio=2"], "min_lr_ratio"),
    # Values at the edge of their type (issue 11): one line, before anything runs.
    (["trainer.seed=18446744073709551617"], "trainer.seed must be between 0 and 4,294,967,295"),
    (["trainer.seed=-1"], "trainer.seed must be between"),
    (["data=text", "trainer.seed=100000000000"], "trainer.seed must be between"),
    (["data.seed=18446744073709551617"], "data.seed must be between"),
    (["trainer.dist_timeout_s=1e30"], "trainer.dist_timeout_s must be between"),
    (["trainer.dist_timeout_s=nan"], "trainer.dist_timeout_s must be > 0"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS,
                         ids=[" ".join(getattr(case, "values", case)[0]) for case in BAD_INPUTS])
@pytest.mark.integration
def test_bad_input_fails_cleanly(run_cli, tmp_path, args, message):
    # An earlier run's files must survive a failed run.
    earlier = tmp_path / "outputs" / "earlier_train"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.pt").write_bytes(b"precious")
    result = run_cli("train", *args, "trainer.max_steps=2")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert (earlier / "checkpoints" / "last.pt").read_bytes() == b"precious"


@pytest.mark.integration
def test_a_failed_sweep_job_does_not_stop_the_sweep(run_cli):
    result = run_cli("train", "-m", "optim.lr=-1,1e-2", "trainer.max_steps=10")
    assert result.returncode == 2, result.output
    assert "1 job(s) of the sweep failed" in result.stderr and "optim.lr=-1" in result.stderr
    sweep = next((result.cwd / "outputs").glob("*/*_train_multirun"))
    assert (sweep / "1" / "summary.json").is_file()  # the second job still ran
    assert not (sweep / "0" / "summary.json").exists()


@pytest.mark.integration
def test_a_used_run_dir_is_never_overwritten(run_cli):
    first = run_cli("train", "trainer.max_steps=5", "hydra.run.dir=runs/fixed")
    assert first.returncode == 0, first.output
    ckpt = first.cwd / "runs" / "fixed" / "checkpoints" / "step_00000005.pt"
    before = ckpt.read_bytes()
    refused = run_cli("train", "trainer.max_steps=8", "hydra.run.dir=runs/fixed", "trainer.resume=none")
    assert refused.returncode == 2 and "already holds an earlier run" in refused.stderr
    assert "trainer.resume=auto" in refused.stderr
    # The default, trainer.resume=auto, continues that run instead (here: 3 more steps).
    continued = run_cli("train", "trainer.max_steps=8", "hydra.run.dir=runs/fixed")
    assert continued.returncode == 0, continued.output
    summary = json.loads((first.cwd / "runs" / "fixed" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from"].endswith("step_00000005.pt")
    assert ckpt.read_bytes() == before


@pytest.mark.integration
def test_a_finished_run_without_checkpoints_is_never_overwritten(run_cli):
    first = run_cli("train", "trainer.max_steps=5", "hydra.run.dir=runs/fixed", "trainer.save_checkpoints=false")
    assert first.returncode == 0, first.output
    second = run_cli("train", "trainer.max_steps=8", "hydra.run.dir=runs/fixed")
    assert second.returncode == 2 and "already holds an earlier run" in second.stderr


@pytest.mark.integration
def test_eval_refuses_to_resplit_the_data(run_cli):
    trained = run_cli("train", "trainer.max_steps=5")
    result = run_cli("eval", f"ckpt={trained.run_dir()}", "+data.seed=3")
    assert result.returncode == 2 and "re-split" in result.stderr


@pytest.mark.integration
def test_our_errors_are_one_line(run_cli):
    result = run_cli("train", "optim.lr=-1")
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "optim.lr=1e-3" in errors[0]


@pytest.mark.integration
def test_debug_flag_shows_the_traceback(run_cli):
    result = run_cli("train", "optim.lr=-1", env={"BIGMODEL_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("args,message", [
    ([], "no checkpoint given"),
    (["ckpt=/no/such.pt"], "does not exist"),
    (["ckpt=CORRUPT"], "corrupt or truncated"),
    (["ckpt=EMPTYDIR"], "no checkpoint in"),
    pytest.param(["ckpt=x.pt", "device=cuda"], "no CUDA device", marks=WITHOUT_GPU),
])
@pytest.mark.integration
def test_eval_bad_input(run_cli, tmp_path, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "emptydir").mkdir()
    args = [a.replace("CORRUPT", str(tmp_path / "corrupt.pt")).replace("EMPTYDIR", str(tmp_path / "emptydir"))
            for a in args]
    result = run_cli("eval", *args)
    assert result.returncode == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


@pytest.mark.integration
def test_shell_completion(run_cli):
    script = run_cli("-sc", "install=bash")
    assert script.returncode == 0 and "complete -o nospace -o default -F hydra_bash_completion bigmodel" in script.stdout
    commands = run_cli("-sc", "query=bash", env={"COMP_LINE": "bigmodel tr"})
    assert commands.stdout.split() == ["train"]
    options = run_cli("-sc", "query=bash", env={"COMP_LINE": "bigmodel train model=c"})
    assert {"model=cnn", "model=custom"} <= set(options.stdout.split())
