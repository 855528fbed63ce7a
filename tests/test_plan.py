"""`bigmodel plan`: the planned memory against measured peaks, and the command's behaviour."""

import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.dist
def test_planned_memory_is_within_20_percent_of_the_measured_peak():
    """Three configurations that fit (one process, with activation checkpointing, FSDP over
    2 ranks): the plan against the peak tensor memory of a real Trainer step (bench/plan_memory.py)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "plan_memory.py"), "--tiny"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 3, done.stdout
    for name, planned, measured, error in rows:
        assert abs(float(error.strip().rstrip("%"))) <= 20, f"{name}: planned {planned} MiB, measured {measured} MiB"

@pytest.mark.integration
def test_gpt2_on_eight_gpus_with_fsdp_plans_without_a_run_dir(run_cli):
    done = run_cli("plan", "model=gpt2", "trainer.devices=8", "trainer.strategy=fsdp", "trainer.precision=bf16")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "124,475,904 parameters" in out
    for part in ("parameters", "gradients", "optimizer state", "activations", "FSDP gathered", "peak"):
        assert part in out
    assert "8 ranks" in out and "strategy fsdp" in out and "precision bf16" in out
    assert "global batch 128" in out and "131,072 tokens per step" in out
    assert "FLOPs" in out and "2,000 in all" in out
    assert "launch     bigmodel train model=gpt2 trainer.devices=8" in out
    assert "reads tokens, not data=digits" in out  # the stand-in data is said
    assert not (done.cwd / "outputs").exists()


@pytest.mark.integration
def test_train_dry_run_prints_the_plan_and_trains_nothing(run_cli):
    done = run_cli("train", "model=cnn", "trainer.dry_run=true")
    assert done.returncode == 0, done.stderr
    assert "cnn: 53,098 parameters" in done.stdout and "Memory per rank" in done.stdout
    assert "steps      " in done.stdout and "per epoch" in done.stdout
    assert not (done.cwd / "outputs").exists()


@pytest.mark.integration
def test_a_gpu_too_small_gets_settings_that_would_fit(run_cli):
    done = run_cli("plan", "model=gpt", "data=text", "data.batch_size=64", "data.block_size=256",
                   "--gpu-memory", "0.25GB")
    assert done.returncode == 0, done.stderr
    assert "fits       NO" in done.stdout
    assert "model.activation_checkpointing=true:" in done.stdout
    assert "trainer.grad_accum_steps=" in done.stdout
    fits = run_cli("plan", "model=gpt", "data=text", "--gpu-memory=H100")
    assert "fits       yes" in fits.stdout


@pytest.mark.parametrize("args, words", [
    (("trainer.device=cuda", "trainer.devices=64"), "no node holds more than 16"),
    (("trainer.device=cpu", "trainer.devices=100000"), "CPU cores"),
    (("--gpu-memory", "lots"), "--gpu-memory 'lots'"),
    (("--gpu-memory",), "--gpu-memory needs a value"),
    (("trainer.max_step=3",), "did you mean trainer.max_steps"),
    (("model=resnet",), "did you mean model=cnn"),
    (("data=tokens",), "data.vocab_size"),
])
@pytest.mark.integration
def test_bad_input_is_one_line_and_exit_2(run_cli, args, words):
    done = run_cli("plan", *args)
    assert done.returncode == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert "Traceback" not in done.output
    assert not (done.cwd / "outputs").exists()


@pytest.mark.integration
def test_plan_help_and_the_command_list(run_cli):
    assert "plan" in run_cli("--help").stdout
    done = run_cli("plan", "--help")
    assert done.returncode == 0 and "bigmodel plan" in done.stdout and "dry_run" in done.stdout


@pytest.mark.integration
def test_a_dry_run_sweep_plans_each_job_and_writes_nothing(run_cli):
    done = run_cli("train", "-m", "trainer.dry_run=true", "model=mlp,cnn")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Memory per rank") == 2
    assert not (done.cwd / "outputs").exists()


@pytest.mark.integration
def test_a_stand_in_keeps_the_batch_size_given(run_cli):
    done = run_cli("plan", "model=gpt2", "data.batch_size=1", "--gpu-memory", "2GB")
    assert done.returncode == 0, done.stderr
    assert "batch      1 per rank" in done.stdout
    launch = next(line for line in done.stdout.splitlines() if line.startswith("launch"))
    assert "data.batch_size=1" in launch and "data.batch_size=16" not in launch
