"""Sweeps as a workflow: the summary at the end of every -m run and from `bigmodel summary`,
failed and diverged jobs under every launcher and sweeper, Optuna's study in the sweep dir,
and the shipped Slurm/torchrun scripts on a real (local, one-node) Slurm."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, outcome_lines, slurm_is_up


FAST = ("trainer.progress=plain", "trainer.threads=1")


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_submitit = pytest.mark.skipif(not has("hydra_plugins.hydra_submitit_launcher"),
                                    reason="pip install 'bigmodel[slurm]' (Hydra's submitit launcher)")
needs_optuna = pytest.mark.skipif(not has("hydra_plugins.hydra_optuna_sweeper"),
                                  reason="pip install 'bigmodel[optuna]' (Hydra's Optuna sweeper)")
needs_joblib = pytest.mark.skipif(not has("hydra_plugins.hydra_joblib_launcher"),
                                  reason="pip install 'bigmodel[joblib]' (Hydra's joblib launcher)")
needs_slurm = pytest.mark.skipif(not slurm_is_up(), reason="no running Slurm (scripts/local_slurm.sh starts one)")


def sweep_dir(cwd: Path) -> Path:
    found = sorted((cwd / "outputs").glob("*/*_multirun"))
    assert len(found) == 1, found
    return found[0]


def jobs_by_lr(folder: Path) -> dict:
    return {row["optim.lr"]: row for row in json.loads((folder / "summary.json").read_text())["jobs"]}


@pytest.mark.integration
def test_sweep_ends_with_a_summary_and_lists_the_diverged_job(run_cli, tmp_path):
    """Acceptance 2: a 4-point lr sweep plus lr=1e3, which diverges; the others finish."""
    result = run_cli("train", "-m", "optim.lr=1e-4,1e-3,1e-2,1e-1,1e3", "trainer.max_steps=40", *FAST,
                     timeout=900)
    assert result.returncode == 0, result.output  # a diverged job is a result, not a failure
    folder = sweep_dir(tmp_path)
    for name in ("summary.csv", "summary.json", "sweep.png"):
        assert (folder / name).is_file(), name
    assert "sweep: 5 job(s), best val/loss first" in result.stdout
    jobs = jobs_by_lr(folder)
    assert jobs["1000.0"]["status"] == "diverged" and "non-finite" in jobs["1000.0"]["reason"]
    assert all(jobs[lr]["status"] == "finished" for lr in ("0.0001", "0.001", "0.01", "0.1"))
    ranked = json.loads((folder / "summary.json").read_text())["jobs"]
    finished = [row["best"] for row in ranked if row["status"] == "finished"]
    assert finished == sorted(finished) and ranked[-1]["status"] == "diverged"  # best first
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["optim.lr"] for r in rows] == [r["optim.lr"] for r in ranked]
    # On demand: the same table and files again.
    written = (folder / "summary.json").read_text()
    (folder / "summary.json").unlink()
    again = run_cli("summary", str(folder))
    assert again.returncode == 0, again.output
    assert json.loads((folder / "summary.json").read_text()) == json.loads(written)
    assert "sweep: 5 job(s)" in again.stdout


@pytest.mark.integration
def test_failed_job_exits_nonzero_after_the_others_and_the_summary(run_cli, tmp_path):
    result = run_cli("train", "-m", "trainer.monitor=val/loss,val/bogus", "trainer.max_steps=10", *FAST)
    assert result.returncode == 2, result.output
    folder = sweep_dir(tmp_path)
    rows = json.loads((folder / "summary.json").read_text())["jobs"]
    assert [r["status"] for r in rows] == ["finished", "failed"]
    assert "val/bogus is not a validation metric" in rows[1]["reason"]
    assert "error: 1 job(s) of the sweep failed:" in result.stderr
    assert (folder / "1" / "outcome.json").is_file()  # a failed job's dir is kept: the summary names it


@pytest.mark.e2e  # each job a process of its own (submitit)
@needs_submitit
def test_submitit_local_launcher_reports_failed_and_diverged_jobs(run_cli, tmp_path):
    """Under hydra/launcher=local each job is a process of its own: the failures come back
    through the job dirs, not through this process."""
    result = run_cli("train", "-m", "hydra/launcher=local", "optim.lr=1e-2,1e3", "trainer.monitor=val/loss,val/bogus",
                     "trainer.max_steps=20", *FAST, timeout=600)
    assert result.returncode == 2, result.output
    rows = json.loads((sweep_dir(tmp_path) / "summary.json").read_text())["jobs"]
    by_status = sorted(r["status"] for r in rows)
    assert by_status == ["diverged", "failed", "failed", "finished"], rows
    assert "error: 2 job(s) of the sweep failed:" in result.stderr


@pytest.mark.e2e
@needs_joblib
def test_joblib_launcher_runs_a_cpu_sweep(run_cli, tmp_path):
    """e2e: joblib's launcher runs each job in a worker process of its own (each starts an
    interpreter and imports torch: more CPU than the integration tier's budget)."""
    result = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-2,1e-1",
                     "trainer.max_steps=20", *FAST, timeout=600)
    assert result.returncode == 0, result.output
    assert [r["status"] for r in json.loads((sweep_dir(tmp_path) / "summary.json").read_text())["jobs"]] == \
        ["finished", "finished"]


@pytest.mark.e2e
@needs_optuna
def test_optuna_study_runs_reports_its_best_and_continues_after_a_kill(tmp_path):
    """Acceptance 3: 6 trials over interval(1e-4,1e-1); killed after 2 trials, the same
    command with hydra.sweep.dir continues the study to 6 trials in all."""
    args = ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "optim.lr=interval(1e-4,1e-1)",
            "trainer.max_steps=30", "trainer.monitor=val/accuracy", *FAST, "hydra.sweep.dir=sweep"]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BIGMODEL_DEBUG")}
    first = subprocess.Popen([sys.executable, "-m", "bigmodel_cli", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "sweep" / "1" / "summary.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first trials did not finish"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    again = subprocess.run([sys.executable, "-m", "bigmodel_cli", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing Optuna study 'bigmodel'" in again.stdout + again.stderr
    import optuna

    study = optuna.load_study(study_name="bigmodel", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert len(study.trials) == 6 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = json.loads((tmp_path / "sweep" / "summary.json").read_text())["jobs"][0]
    assert best["status"] == "finished"
    assert best["best"] == pytest.approx(study.best_value)
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()
    job_dirs = sorted(int(p.name) for p in (tmp_path / "sweep").iterdir() if p.name.isdigit())
    assert job_dirs == sorted(set(job_dirs)) and max(job_dirs) == 5  # new trials, new dirs


@pytest.mark.integration
@needs_optuna
@pytest.mark.cpu_budget(40, reason="three sweeps, two of them Optuna studies in SQLite")
def test_optuna_jobs_never_reuse_earlier_job_dirs_and_a_shared_study_is_not_settled(run_cli, tmp_path):
    """An Optuna sweep into a sweep dir that already holds jobs (of a basic sweep) numbers
    its jobs after them, so no trial resumes another run's checkpoint; a study in storage
    outside the sweep dir gets n_trials more, as the plugin does."""
    first = run_cli("train", "-m", "optim.lr=1e-3", "trainer.max_steps=10", *FAST, "hydra.sweep.dir=sweep")
    assert first.returncode == 0, first.output
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    for _ in range(2):
        result = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                         "optim.lr=tag(log,interval(1e-4,1e-1))", "trainer.max_steps=10", *FAST,
                         "hydra.sweep.dir=sweep", f"hydra.sweeper.storage={storage}")
        assert result.returncode == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()) == list("012")
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())["jobs"]
    assert len(rows) == 3 and all(r["status"] == "finished" and r["steps"] == 10 for r in rows)
    import optuna

    assert len(optuna.load_study(study_name="bigmodel", storage=storage).trials) == 2


@pytest.mark.unit
@needs_optuna
def test_trials_a_kill_left_running_are_settled_from_their_job_dirs(tmp_path):
    """Killed after a trial's job wrote summary.json but before the sweeper told the study:
    that trial counts as complete with its job's value (the summary lists the job, so the
    study's best must agree); a trial whose job never finished is failed."""
    import optuna

    from bigmodel_cli.sweepers import settle_earlier_trials

    db = tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"
    study = optuna.create_study(study_name="bigmodel", storage=storage, direction="maximize")
    for number, lr in enumerate((0.001, 0.0123456789)):  # two trials left running, as a kill leaves them
        study.enqueue_trial({"optim.lr": lr})
        assert study.ask().suggest_float("optim.lr", 1e-4, 1e-1, log=True) == lr
        job = tmp_path / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- trainer.max_steps=5\n")
    (tmp_path / "0" / "summary.json").write_text(json.dumps(
        {"monitor": "val/accuracy", "monitor_mode": "max", "best_value": 0.75, "steps": 5}))
    assert settle_earlier_trials(storage, "bigmodel", db) == 2
    settled = optuna.load_study(study_name="bigmodel", storage=storage).trials
    assert [t.state.name for t in settled] == ["COMPLETE", "FAIL"]
    assert settled[0].value == 0.75


@pytest.mark.unit
def test_a_sweep_token_admits_only_the_jobs_of_the_sweep_that_holds_the_lock(tmp_path, monkeypatch):
    from bigmodel_cli import run_lock

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    monkeypatch.setenv(run_lock.SWEEP_ENV, run_lock.sweep_token(sweep))
    holder = json.loads(os.environ[run_lock.SWEEP_ENV])
    assert run_lock._job_of({"pid": holder["pid"], "host": holder["host"]}, sweep)
    assert not run_lock._job_of({"pid": holder["pid"] + 1, "host": holder["host"]}, sweep)  # another sweep
    monkeypatch.setenv(run_lock.SWEEP_ENV, str(sweep))  # exported by hand: no token
    assert not run_lock._job_of({"pid": holder["pid"], "host": holder["host"]}, sweep)


@pytest.mark.e2e  # each job a process of its own (submitit)
@needs_optuna
@needs_submitit
def test_the_same_optuna_sweep_runs_through_the_submitit_local_launcher(run_cli, tmp_path):
    # Three trials: more than one batch of the sweeper's n_jobs (2), the last one short.
    result = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra/launcher=local", "hydra.sweeper.n_trials=3",
                     "hydra.sweeper.n_jobs=2", "optim.lr=interval(1e-4,1e-1)", "trainer.max_steps=10", *FAST,
                     timeout=1200)
    assert result.returncode == 0, result.output
    folder = sweep_dir(tmp_path)
    rows = json.loads((folder / "summary.json").read_text())["jobs"]
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows)
    assert "best_value" in (folder / "optimization_results.yaml").read_text()


@pytest.mark.integration
@needs_optuna
def test_optuna_study_goes_on_after_a_diverged_and_a_failed_trial(run_cli, tmp_path):
    """Optuna ends a study on a NaN objective; a diverged trial reports the worst value and a
    failed one is a failed trial instead, so every trial runs and the best is reported."""
    result = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                     "optim.lr=choice(0.01,1000.0,-1.0)", "trainer.max_steps=20", *FAST, timeout=600)
    assert result.returncode == 2, result.output  # a failed trial (lr=-1 is refused)
    folder = sweep_dir(tmp_path)
    statuses = {r["optim.lr"]: r["status"] for r in json.loads((folder / "summary.json").read_text())["jobs"]}
    assert statuses == {"0.01": "finished", "1000.0": "diverged", "-1.0": "failed"}
    assert "optim.lr: 0.01" in (folder / "optimization_results.yaml").read_text()


@pytest.mark.e2e
def test_missing_plugins_name_the_extra(run_cli, tmp_path):
    """A `hydra_plugins` package earlier on the path hides the installed plugins."""
    shadow = tmp_path / "shadow" / "hydra_plugins"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO}"}
    for choice, extra in (("hydra/sweeper=optuna", "optuna"), ("hydra/launcher=slurm", "slurm"),
                          ("hydra/launcher=local", "slurm"), ("hydra/launcher=joblib", "joblib")):
        result = run_cli("train", "-m", choice, "optim.lr=1e-3,1e-2", env=env)
        assert result.returncode == 2, result.output
        assert outcome_lines(result.stderr) == [
            f"error: {choice} needs a Hydra plugin that is not installed; pip install 'bigmodel[{extra}]'"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.integration
@needs_optuna
def test_bad_search_space_is_one_line(run_cli, tmp_path):
    for bad, expected in (("optim.lr=interval(1e-4)", "cannot read the search space 'optim.lr=interval(1e-4)'"),
                          ("optim.lrr=interval(1e-4,1e-1)", "unknown key optim.lrr; did you mean optim.lr?"),
                          ("trainer.max_steps=interval(0.5,1.5)", "bad value for trainer.max_steps"),
                          ("optim.lr=tag(log,interval(1e-1,1e-4))", "interval(0.1,0.0001) is empty"),
                          ("optim.lr=tag(log,interval(0,1e-1))", "a log-scale interval needs a low end above 0")):
        result = run_cli("train", "-m", "hydra/sweeper=optuna", bad)
        assert result.returncode == 2, result.output
        lines = outcome_lines(result.stderr)
        assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.integration
def test_summary_of_nothing_is_one_line(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for target, expected in (("empty", "no runs in empty"), ("missing", "missing does not exist")):
        result = run_cli("summary", target)
        assert result.returncode == 2
        assert len(outcome_lines(result.stderr)) == 1 and expected in result.stderr


@pytest.mark.integration
def test_summary_reads_damaged_and_unfinished_job_dirs(run_cli, tmp_path):
    """Job dirs as a kill -9 or a broken disk leaves them: listed, never a crash."""
    sweep = tmp_path / "sweep"
    for num, files in {"0": {"summary.json": "{not json"}, "1": {"outcome.json": "[1, 2]"},
                       "2": {".hydra/overrides.yaml": "- optim.lr=0.1\n",
                             "metrics.jsonl": '{"step": 7, "loss": 1.0}\n1\n{"val/loss": 1' + "0" * 400 + '}\n{"st'},
                       "3": {"summary.json": json.dumps({"monitor": "val/loss", "best_value": "x", "steps": -1,
                                                         "final_val": [], "early_stop": None})},
                       "4": {"outcome.json": '{"status": "failed", "steps": 1e999}',
                             ".hydra/overrides.yaml": "- data.path=[/x]\n- '[bold]=1'\n"},
                       "5": {"summary.json": '{"steps": NaN, "best_value": Infinity}'}}.items():
        for name, text in files.items():
            (sweep / num / name).parent.mkdir(parents=True, exist_ok=True)
            (sweep / num / name).write_text(text)
    result = run_cli("summary", str(sweep))
    assert result.returncode == 0, result.output
    rows = json.loads((sweep / "summary.json").read_text())["jobs"]
    assert len(rows) == 6
    assert {r["status"] for r in rows} <= {"no result", "failed", "finished"}
    assert next(r for r in rows if r["run_dir"] == "2")["steps"] == 7
    assert "data.path=[/x]" in result.stdout  # shown as text, not as console markup
    # A run dir's own summary.json is never overwritten by a sweep table.
    run = sweep / "3"
    before = (run / "summary.json").read_text()
    refused = run_cli("summary", ".", cwd=run)
    assert refused.returncode == 2 and "is a run dir" in refused.stderr
    assert (run / "summary.json").read_text() == before


# ------------------------------------------------------------------ cluster scripts


def slurm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "BIGMODEL": f"{sys.executable} -m bigmodel_cli", "PYTHONPATH": str(REPO)}


def wait_for_jobs(job_id: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30)
        if queued.returncode == 0 and not queued.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"Slurm job {job_id} did not end in {timeout}s")


def sbatch(cwd: Path, *args: str) -> str:
    job = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=slurm_env(), capture_output=True,
                         text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


#: the GPU templates on this CPU-only one-node cluster: no GPUs, one node, 2 tasks
ON_CPU = ("--nodes=1", "--gpus-per-task=0", "--ntasks-per-node=2", "--cpus-per-task=1")


@needs_slurm
@pytest.mark.parametrize("template, flags, device", [
    ("train-cpu.sbatch", (), ()),  # acceptance 1: sbatch scripts/slurm/train-cpu.sbatch trainer.max_steps=20
    ("train.sbatch", ON_CPU, ("trainer.device=cpu",)),
    ("train-multinode.sbatch", ON_CPU, ("trainer.device=cpu",))])
@pytest.mark.slurm
def test_sbatch_templates_train_with_two_ranks(tmp_path, template, flags, device):
    job_id = sbatch(tmp_path, *flags, str(REPO / "scripts" / "slurm" / template), *device, "trainer.max_steps=20",
                    "trainer.progress=plain")
    wait_for_jobs(job_id)
    run_dir = tmp_path / "outputs" / "slurm" / job_id
    log = (run_dir / "slurm.out").read_text() if (run_dir / "slurm.out").exists() else "(no slurm.out)"
    assert (run_dir / "summary.json").is_file(), log[-3000:]
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["world_size"] == 2 and done["steps"] == 20
    assert sorted(p.name for p in (tmp_path / "outputs" / "slurm").iterdir()) == [job_id]  # one run dir


@pytest.mark.slurm
@needs_slurm
def test_array_sbatch_template_runs_a_two_point_sweep(run_cli, tmp_path):
    job_id = sbatch(tmp_path, "--array=0-1", str(REPO / "scripts" / "slurm" / "sweep-array.sbatch"),
                    "optim.lr=1e-3", "optim.lr=1e-2", "--", "trainer.max_steps=20", "trainer.progress=plain")
    wait_for_jobs(job_id)
    folder = tmp_path / "outputs" / "slurm" / job_id
    for task in ("0", "1"):
        assert (folder / task / "summary.json").is_file(), (folder / task / "slurm.out").read_text()[-2000:]
    result = run_cli("summary", str(folder))
    assert result.returncode == 0, result.output
    assert sorted(jobs_by_lr(folder)) == ["1e-2", "1e-3"]


@pytest.mark.slurm
@needs_slurm
@needs_submitit
def test_slurm_launcher_job_checkpoints_on_usr2_and_is_requeued(run_cli, tmp_path):
    """hydra/launcher=slurm: 2 ranks per job; SIGUSR2 (what submitit's sbatch sends before the
    time limit) makes the job checkpoint and requeue, and the requeued job finishes the run
    in the same job dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    args = ["train", "-m", "hydra/launcher=slurm", "trainer.device=cpu", "trainer.devices=2", "optim.lr=1e-2",
            "trainer.max_steps=2500", "trainer.val_every=500", *FAST, "hydra.sweep.dir=sweep",
            "hydra.launcher.timeout_min=30"]
    launcher = subprocess.Popen([sys.executable, "-m", "bigmodel_cli", *args], cwd=tmp_path, env=env,
                                stdout=open(tmp_path / "out.txt", "w"), stderr=subprocess.STDOUT)
    metrics = tmp_path / "sweep" / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and any(json.loads(line).get("step", 0) >= 200
                                        for line in metrics.read_text().splitlines() if line.endswith("}"))):
        assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
        time.sleep(0.5)
    job_id = next(p.name for p in (tmp_path / "sweep" / ".submitit").iterdir()
                  if p.is_dir() and p.name.replace("_", "").isdigit())  # <array job>_<task>
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    try:
        launcher.wait(timeout=600)  # Slurm holds a requeued job for cred_expire (120 s by default)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            subprocess.run(["scancel", job_id.split("_")[0]], timeout=30)
    out = (tmp_path / "out.txt").read_text()
    assert launcher.returncode == 0, out[-3000:]
    logs = (tmp_path / "sweep" / "0" / "train.log").read_text()
    assert "SIGUSR2: requeued the Slurm job" in logs
    done = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    assert done["steps"] == 2500 and done["world_size"] == 2 and "step_" in done["resumed_from"]


@pytest.mark.dist
def test_torchrun_multinode_script_joins_two_nodes(tmp_path):
    """scripts/torchrun/multinode.sh started twice on this machine, as on two nodes."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))},
           "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500),
           "NPROC": "1", "RUN_ID": "two-nodes", "BIGMODEL_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    script = str(REPO / "scripts" / "torchrun" / "multinode.sh")
    nodes = [subprocess.Popen([script, "trainer.max_steps=20", "trainer.device=cpu", *FAST], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    done = json.loads((tmp_path / "outputs" / "torchrun" / "two-nodes" / "summary.json").read_text())
    assert done["world_size"] == 2 and done["steps"] == 20


@pytest.mark.unit
def test_the_torch_free_direction_agrees_with_the_tasks():
    """run_files.LARGER_IS_BETTER (read without torch: summaries, plots, Optuna's direction)
    lists exactly the metrics the tasks maximise."""
    from bigmodel_cli.engine.tasks import Task
    from bigmodel_cli.telemetry.run_files import LARGER_IS_BETTER, direction

    maximised = {m for task in Task.__subclasses__() for m, larger in task.metrics.items() if larger}
    assert maximised == set(LARGER_IS_BETTER)
    assert direction("val/accuracy") == "maximize" and direction("val/loss") == "minimize"
    assert direction("val/accuracy", "min") == "minimize"
