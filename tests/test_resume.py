"""Checkpoints that survive anything: exact resume after any stop, signals, requeue,
damaged and malicious checkpoint files, fine-tuning from another run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigmodel_cli.commands.train import train
from bigmodel_cli.engine.checkpoint import load_checkpoint
from bigmodel_cli.errors import UserError
from conftest import bigmodel, slurm_is_up


HELPERS = Path(__file__).parent / "helpers"
# Dropout on (the RNG streams must continue exactly), a loss record every step, a cosine
# schedule with warmup (the default). Digits: 19 optimizer steps per epoch.
BASE = ("model.hidden_sizes=[64]", "model.dropout=0.2", "trainer.log_every=1", "trainer.val_every=9",
        "trainer.progress=plain")
STEPS_PER_EPOCH = 19


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def val_losses(run_dir: Path):
    return {r["step"]: r["val/loss"] for r in records(run_dir) if "val/loss" in r}


def summary(run_dir: Path):
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_run(resumed: Path, reference: Path):
    """Every per-step loss, validation and the final test metrics, bit for bit."""
    assert step_losses(resumed) == step_losses(reference)
    assert val_losses(resumed) == val_losses(reference)
    assert summary(resumed)["test"] == summary(reference)["test"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("HYDRA_FULL_ERROR", "BIGMODEL_DEBUG")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Started:
    """A `bigmodel train` running in the background. Its output goes to files, not pipes:
    an unread pipe fills up and would stall the run."""

    def __init__(self, cwd: Path, args, env):
        self.out, self.err = cwd / f"stdout-{time.time_ns()}.txt", cwd / f"stderr-{time.time_ns()}.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "bigmodel_cli", "train", *args], cwd=cwd,
                                         env=env, stdout=out, stderr=err)
        self.pid = self.proc.pid

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()

    def communicate(self, timeout: float = 60):
        self.proc.wait(timeout=timeout)
        return self.out.read_text(), self.err.read_text()


def start_cli(cwd: Path, *args: str, env=None) -> Started:
    return Started(cwd, args, env or clean_env())


def wait_for_step(proc: Started, metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-2000:]}"
        if metrics.exists() and any(r.get("step", 0) >= step for r in map(json.loads, _lines(metrics))):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _lines(path: Path):
    lines = path.read_text().splitlines()
    return lines[:-1] if lines and not lines[-1].endswith("}") else lines  # one may be half-written


# ------------------------------------------------------------------ exactness


@pytest.mark.integration
def test_exact_resume_at_an_epoch_boundary_and_inside_an_epoch(compose, tmp_path):
    full = tmp_path / "full"
    train(compose(*BASE, "trainer.max_steps=45", "trainer.checkpoint_every=1", "trainer.keep_last=100"), full)
    epoch_end = next(r for r in records(full) if r.get("step") == STEPS_PER_EPOCH)
    assert epoch_end["epoch"] == 1.0
    for step in (STEPS_PER_EPOCH, 30):
        resumed = tmp_path / f"from{step}"
        ckpt = full / "checkpoints" / f"step_{step:08d}.pt"
        out = train(compose(*BASE, "trainer.max_steps=45", f"trainer.resume={ckpt}"), resumed)
        assert out["resumed_from"] == str(ckpt)
        assert min(step_losses(resumed)) == step + 1
        losses = step_losses(full)
        assert step_losses(resumed) == {s: v for s, v in losses.items() if s > step}
        assert summary(resumed)["test"] == summary(full)["test"]


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_stopped_at_a_random_step_then_resume_auto_matches_an_uninterrupted_run(run_cli, tmp_path, sig):
    args = (*BASE, "trainer.max_steps=500", "trainer.val_every=100", "trainer.checkpoint_every=25")
    reference = run_cli("train", *args, "hydra.run.dir=reference")
    assert reference.returncode == 0, reference.output
    stop_at = random.Random(sig).randint(60, 300)
    proc = start_cli(tmp_path, *args, "hydra.run.dir=victim")
    wait_for_step(proc, tmp_path / "victim" / "metrics.jsonl", stop_at)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # finishes its step, writes a checkpoint, says how to continue, exits 75
        assert proc.returncode == 75, stderr
        assert "stopped: SIGTERM: stopped at step" in stderr and "trainer.resume=auto" in stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "victim" / "summary.json").exists()
    resumed = run_cli("train", *args, "hydra.run.dir=victim")  # trainer.resume=auto is the default
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.output
    assert_same_run(tmp_path / "victim", tmp_path / "reference")


@pytest.mark.dist
def test_two_rank_ddp_stopped_by_sigterm_resumes_exactly(run_cli, tmp_path):
    args = (*BASE, "trainer.devices=2", "trainer.device=cpu", "trainer.max_steps=200", "trainer.val_every=50",
            "trainer.checkpoint_every=16")
    reference = run_cli("train", *args, "hydra.run.dir=reference", timeout=240)
    assert reference.returncode == 0, reference.output
    proc = start_cli(tmp_path, *args, "hydra.run.dir=victim")
    wait_for_step(proc, tmp_path / "victim" / "metrics.jsonl", 60)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it to both workers
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 75, stderr
    assert "stopped: SIGTERM" in stderr
    resumed = run_cli("train", *args, "hydra.run.dir=victim", timeout=240)
    assert resumed.returncode == 0, resumed.output
    assert_same_run(tmp_path / "victim", tmp_path / "reference")
    # And from a checkpoint at an epoch boundary (8 steps per rank's epoch), into a new run dir.
    boundary = run_cli("train", *args, "hydra.run.dir=boundary",
                       f"trainer.resume={tmp_path}/reference/checkpoints/step_00000192.pt", timeout=240)
    assert boundary.returncode == 0, boundary.output
    reference_losses = step_losses(tmp_path / "reference")
    assert step_losses(tmp_path / "boundary") == {s: v for s, v in reference_losses.items() if s > 192}


# ------------------------------------------------------------------ damage and safety


@pytest.mark.integration
def test_kill_9_while_writing_a_checkpoint_never_replaces_the_previous_one(run_cli, tmp_path):
    args = ("trainer.max_steps=40", "trainer.checkpoint_every=10", "trainer.val_every=1000",
            "trainer.progress=plain", "hydra.run.dir=run")
    killed = subprocess.run([sys.executable, str(HELPERS / "kill_during_save.py"), "train", *args], cwd=tmp_path,
                            env=clean_env(KILL_AT_SAVE="3"), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_00000010.pt", "step_00000020.pt"]
    assert load_checkpoint(folder / "step_00000020.pt").step == 20
    assert load_checkpoint(folder / "last.pt").step == 20
    assert [p.name for p in folder.glob(".*.tmp")], "the torn write should be a hidden temporary"
    resumed = run_cli("train", *args)
    assert resumed.returncode == 0, resumed.output
    assert summary(tmp_path / "run")["resumed_from"].endswith("step_00000020.pt")
    assert not list(folder.glob(".*.tmp"))  # cleaned up


@pytest.mark.integration
def test_resume_auto_skips_a_truncated_newest_checkpoint(compose, tmp_path, caplog):
    args = ("trainer.checkpoint_every=10", "trainer.val_every=1000", "trainer.progress=plain")
    train(compose(*args, "trainer.max_steps=30"), tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    out = train(compose(*args, "trainer.max_steps=40"), tmp_path)
    assert out["resumed_from"].endswith("step_00000020.pt") and out["steps"] == 40
    assert "skipping damaged checkpoint step_00000030.pt" in caplog.text
    assert (tmp_path / "checkpoints" / ".step_00000030.pt.damaged").exists()  # set aside, not deleted


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.integration
def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(compose, tmp_path, caplog):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "bigmodel-checkpoint/1", "step": 3, "payload": RunsCode(marker)}, evil)
    with pytest.raises(UserError, match="refused to load .*could run code"):
        train(compose("trainer.max_steps=5", f"trainer.resume={evil}"), tmp_path / "a")
    # Planted as the newest checkpoint of a run dir: skipped, the good one before it is used.
    run = tmp_path / "b"
    train(compose("trainer.max_steps=5", "trainer.progress=plain"), run)
    (run / "checkpoints" / "step_00000099.pt").write_bytes(evil.read_bytes())
    out = train(compose("trainer.max_steps=6", "trainer.progress=plain"), run)
    assert out["resumed_from"].endswith("step_00000005.pt")
    assert "refused to load" in caplog.text
    assert not marker.exists()


@pytest.mark.integration
def test_resume_refuses_a_changed_model_and_allows_a_longer_run(compose, tmp_path):
    train(compose("trainer.max_steps=5", "model.hidden_sizes=[32]"), tmp_path)
    with pytest.raises(UserError, match=r"cannot resume: .*model.hidden_sizes \(\[32\] -> \[16\]\)"):
        train(compose("trainer.max_steps=8", "model.hidden_sizes=[16]"), tmp_path)
    assert train(compose("trainer.max_steps=8", "model.hidden_sizes=[32]"), tmp_path)["steps"] == 8


@pytest.mark.integration
def test_init_from_starts_fresh_from_another_runs_weights(compose, tmp_path):
    source = tmp_path / "source"
    first = train(compose("trainer.max_steps=20", "model.hidden_sizes=[32]"), source)
    tuned = train(compose("trainer.max_steps=5", "model.hidden_sizes=[32]", f"trainer.init_from={source}"),
                  tmp_path / "tuned")
    assert tuned["steps"] == 5 and tuned["resumed_from"] is None
    # Its untrained baseline is the source's best model.
    assert val_losses(tmp_path / "tuned")[0] == val_losses(source)[first["best_step"]]
    with pytest.raises(UserError, match=r"does not fit this model: .*has shape \(32, 64\) in the checkpoint "
                                        r"but \(16, 64\) here"):
        train(compose("trainer.max_steps=5", "model.hidden_sizes=[16]", f"trainer.init_from={source}"),
              tmp_path / "mismatch")


# ------------------------------------------------------------------ signals


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])  # sbatch templates, submitit
def test_sigusr1_under_slurm_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, sig):
    """A fake Slurm job: a stub scontrol records the requeue; running the same command again
    with SLURM_RESTART_COUNT=1 (what Slurm does) finds the run dir and finishes the run.
    SIGUSR2 is what submitit's jobs get (hydra/launcher=slurm); it does the same."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    (stub / "scontrol").chmod(0o755)
    env = clean_env(SLURM_JOB_ID="4242", PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    args = ("trainer.max_steps=1000", "trainer.val_every=250", "trainer.progress=plain")
    proc = start_cli(tmp_path, *args, env=env)
    run_dir = _wait_for_run_dir(tmp_path)
    wait_for_step(proc, run_dir / "metrics.jsonl", 300)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert f"{sig.name}: requeued the Slurm job" in stderr
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt").step
    assert 300 <= stopped_at < 1000
    assert json.loads((run_dir / "outcome.json").read_text())["status"] == "stopped"  # for bigmodel summary
    requeued = bigmodel("train", *args, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr
    assert [p for p in (tmp_path / "outputs").glob("*/*_train")] == [run_dir]  # no second run dir
    assert summary(run_dir)["steps"] == 1000
    assert summary(run_dir)["resumed_from"].endswith(f"step_{stopped_at:08d}.pt")
    assert not (run_dir / "outcome.json").exists()  # continued: no longer stopped


def _wait_for_run_dir(cwd: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((cwd / "outputs").glob("*/*_train"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("no run dir appeared")


@pytest.mark.e2e
def test_sigusr1_outside_slurm_writes_a_checkpoint_and_goes_on(tmp_path):
    proc = start_cli(tmp_path, "trainer.max_steps=1000", "trainer.val_every=5000", "trainer.progress=plain",
                     "hydra.run.dir=run")
    wait_for_step(proc, tmp_path / "run" / "metrics.jsonl", 200)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    stdout += stderr
    assert proc.returncode == 0, stderr
    assert "SIGUSR1 wrote checkpoint" in stdout and "training goes on" in stdout
    steps = sorted(int(p.name[5:13]) for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert len(steps) == 2 and 200 <= steps[0] < 1000 and steps[1] == 1000


# ------------------------------------------------------------------ non-finite steps


def flaky(compose, *overrides):
    return compose("model=custom", "model._target_=flaky_model.NonFiniteAt", "+model.at=12",
                   "trainer.grad_clip=null", "trainer.log_every=5", "trainer.val_every=10",
                   "trainer.checkpoint_every=5", "trainer.progress=plain", "trainer.max_steps=30", *overrides)


@pytest.mark.integration
def test_a_non_finite_step_stops_the_run_and_keeps_the_good_checkpoint(compose, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    with pytest.raises(UserError, match="non-finite between steps 11 and 15; the checkpoint of step 10 is kept"):
        train(flaky(compose), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt").step == 10
    assert not list((tmp_path / "checkpoints").glob("step_00000015*"))


@pytest.mark.integration
def test_on_nonfinite_skip_drops_the_step_and_goes_on(compose, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    out = train(flaky(compose, "trainer.on_nonfinite=skip"), tmp_path)
    assert out["skipped_steps"] == 1 and out["steps"] == 30
    weights = load_checkpoint(tmp_path / "checkpoints" / "last.pt").model
    assert all(torch.isfinite(w).all() for w in weights.values())


# ------------------------------------------------------------------ a real Slurm


def job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=20).stdout
    for word in shown.split():
        if word.startswith(field + "="):
            return word.split("=", 1)[1]
    return ""


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_is_up(), reason="no running Slurm (scripts/local_slurm.sh starts one)")
def test_real_sbatch_job_is_signalled_requeued_and_finishes(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --requeue --open-mode=append --output={tmp_path}/job.out -n1
exec {sys.executable} -m bigmodel_cli train trainer.max_steps=2500 trainer.val_every=500 trainer.progress=plain
""")
    env = clean_env()
    job = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=30)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: list((tmp_path / "outputs").glob("*/*_train/metrics.jsonl")), 120, "the run to start")
        run_dir = next((tmp_path / "outputs").glob("*/*_train"))
        wait_until(lambda: any(r.get("step", 0) >= 200 for r in map(json.loads, _lines(run_dir / "metrics.jsonl"))),
                   120, "step 200")
        # What `#SBATCH --signal=B:USR1@90` does before the time limit.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        wait_until(lambda: job_field(job_id, "Restarts") == "1", 120, "the requeue")
        # Slurm holds a requeued job until the old job's credential expires (AuthInfo's
        # cred_expire: 120 s by default, 10 s on scripts/local_slurm.sh's cluster).
        wait_until(lambda: (run_dir / "summary.json").exists(), 420, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    log = (tmp_path / "job.out").read_text()
    assert "SIGUSR1: requeued the Slurm job" in log, log[-3000:]
    assert list((tmp_path / "outputs").glob("*/*_train")) == [run_dir]
    done = summary(run_dir)
    assert done["steps"] == 2500 and "step_" in done["resumed_from"]


@pytest.mark.dist
def test_fsdp_sharded_checkpoints_resume_exactly(run_cli, tmp_path):
    args = ("model=gpt", "data=text", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.dropout=0.1",
            "data.block_size=16", "data.batch_size=4", "trainer.strategy=fsdp", "trainer.devices=2", "trainer.device=cpu",
            "trainer.max_steps=24", "trainer.log_every=1", "trainer.val_every=12", "trainer.eval_batches=4",
            "trainer.checkpoint_every=8", "trainer.keep_last=5", "trainer.progress=plain")
    full = run_cli("train", *args, "hydra.run.dir=full", timeout=300)
    assert full.returncode == 0, full.output
    shards = tmp_path / "full" / "checkpoints" / "step_00000008.dcp"
    assert (shards / ".metadata").is_file()
    resumed = run_cli("train", *args, "hydra.run.dir=resumed", f"trainer.resume={shards}", timeout=300)
    assert resumed.returncode == 0, resumed.output
    reference = step_losses(tmp_path / "full")
    assert step_losses(tmp_path / "resumed") == {s: v for s, v in reference.items() if s > 8}
    assert summary(tmp_path / "resumed")["test"] == summary(tmp_path / "full")["test"]


@pytest.mark.integration
def test_time_based_checkpoints(compose, tmp_path, monkeypatch):
    """Inside a Slurm job too, a timed checkpoint neither requeues nor stops the run."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    marker = tmp_path / "requeued"
    out = train(compose("trainer.max_steps=30", "trainer.val_every=1000", "trainer.checkpoint_every_min=0.0001",
                        "trainer.keep_last=100", "trainer.progress=plain",
                        f"trainer.requeue_command='touch {marker}'"), tmp_path / "run")
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*.pt"))) > 5
    assert out["steps"] == 30 and not marker.exists()  # a stop would have raised TrainingStopped
