"""Hydra's Optuna sweeper with bigmodel's defaults: `hydra/sweeper=optuna`.

- direction from trainer.monitor / trainer.monitor_mode (val/accuracy: maximize), so a
  user never has to remember hydra.sweeper.direction;
- a failed or diverged trial is marked failed and the study goes on (max_failure_rate=1);
- the study lives in SQLite in the sweep dir (optuna.db, study "bigmodel"), and running
  the same command again with hydra.sweep.dir=<that dir> continues it (ContinueStudy): the
  trials already done count towards n_trials, a trial a killed sweep left running counts
  with its job's result if the job finished (failed if not), and new trials get new job dirs.

The plugin (`pip install 'bigmodel[optuna]'`) is optional: without it `hydra/sweeper=optuna`
is refused in one line that names the extra. No torch here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, flag_override

from bigmodel_cli.errors import EXIT_USER_ERROR, first_line
from bigmodel_cli.run_lock import quiet_rank
from bigmodel_cli.telemetry.run_files import direction

log = logging.getLogger("bigmodel")

STUDY_NAME = "bigmodel"


def gpus(device: str, count: Any) -> Any:
    """GPUs a submitit job asks for: `count` unless the trainer runs on the CPU."""
    return None if str(device).startswith("cpu") else int(count)


def register_resolver() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("bigmodel_gpus", gpus, replace=True)

    OmegaConf.register_new_resolver("bigmodel_direction", direction, replace=True)
    OmegaConf.register_new_resolver("bigmodel_plus", lambda a, b: int(a) + int(b), replace=True)


def register_optuna_defaults() -> None:
    """Store `hydra/sweeper=optuna` with bigmodel's defaults over the plugin's own node."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:
        return
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's one plugin scan runs the plugin's module (and its store) again

    node = OptunaSweeperConf(
        direction="${bigmodel_direction:${trainer.monitor},${trainer.monitor_mode}}",
        storage="sqlite:///${hydra.sweep.dir}/optuna.db", study_name=STUDY_NAME,
        n_jobs=1, max_failure_rate=1.0)
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=node, provider="bigmodel")


class ContinueStudy(Callback):
    """Registered in conf/train.yaml. Before an Optuna sweep starts: new jobs are numbered
    after the job dirs already in the sweep dir (never into an earlier trial's dir), and if
    the study is the sweep dir's own (optuna.db in it, the default), its trials done count
    towards n_trials and those a killed sweep left running are settled from their job
    dirs (complete if the job finished, failed if not). A study in
    storage of your own is left as the plugin leaves it: n_trials more. Sweepers are
    plugins that Hydra builds after this hook, from the config this hook adjusts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if "optuna" not in str(sweeper.get("_target_", "")) or quiet_rank():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        own = own_study_file(sweeper.get("storage"), sweep_dir)
        done = settle_earlier_trials(sweeper.get("storage"), sweeper.get("study_name"), own) if own else 0
        first_job = max(done, next_job_number(sweep_dir))
        left = max(0, int(sweeper.n_trials) - done)
        if done:
            log.info("continuing Optuna study %r: %d trial(s) done, %d to go", sweeper.study_name, done, left)
        if not first_job:
            return
        with flag_override(config, ["readonly", "struct"], [False, False]):
            sweeper.n_trials = left
            # Each job's config is composed again from these overrides (under every launcher).
            config.hydra.overrides.hydra.append(
                f"hydra.sweep.subdir='${{bigmodel_plus:${{hydra.job.num}},{first_job}}}'")


def own_study_file(storage: Any, sweep_dir: Path) -> Optional[Path]:
    """The SQLite file of `storage` if it lies in the sweep dir (the study is this sweep's)."""
    prefix = "sqlite:///"
    if not isinstance(storage, str) or not storage.startswith(prefix):
        return None
    path = Path(storage[len(prefix):])
    try:
        return path if path.resolve().parent == sweep_dir.resolve() else None
    except OSError:
        return None


def next_job_number(sweep_dir: Path) -> int:
    """One past the highest numbered job dir in the sweep dir (0 for a new sweep)."""
    if not sweep_dir.is_dir():
        return 0
    numbers = [int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(numbers) + 1 if numbers else 0


def settle_earlier_trials(storage: Any, study_name: Any, study_file: Path) -> int:
    """How many trials the sweep's own study already has; those a killed sweep left
    running are settled from their job dirs (settle_killed_trial). A damaged study file
    ends the command with one line."""
    if study_name is None or not study_file.is_file():
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=str(study_name), storage=storage)
        trials = study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state == optuna.trial.TrialState.RUNNING:
                settle_killed_trial(study, trial, study_file.parent)
    except KeyError:  # no such study in it yet: a new one
        return 0
    except Exception as err:  # noqa: BLE001 - sqlite's and SQLAlchemy's errors on a damaged file
        print(f"error: cannot read the Optuna study in {study_file} ({first_line(err)}); move it away to "
              "start a new study, or pick a new hydra.sweep.dir", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    return len(trials)


def settle_killed_trial(study: Any, trial: Any, sweep_dir: Path) -> None:
    """A trial the killed sweep left running: complete, with its job's value, if its job
    finished before the kill (the sweep summary lists that job, so the study must too);
    failed otherwise (its job never reported)."""
    import optuna

    job = finished_job_of(trial, sweep_dir)
    if job is not None:
        study.tell(trial.number, job.best)
    else:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def finished_job_of(trial: Any, sweep_dir: Path) -> Optional[Any]:
    """The finished, scored job whose overrides hold the trial's parameters; the dir
    numbered like the trial is looked at first (the usual case)."""
    from bigmodel_cli.run_outcome import read_job

    dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: (p.name != str(trial.number), int(p.name)))
    for job_dir in dirs:
        job = read_job(job_dir)
        pairs = (o.partition("=") for o in job.overrides)
        if job.scored and params_match(trial.params, {k.lstrip("+~"): v for k, sep, v in pairs if sep}):
            return job
    return None


def params_match(params: dict, overrides: dict) -> bool:
    """Every trial parameter is in the overrides with the same value (floats compared as
    numbers: the sweeper writes them with str())."""
    if not params:
        return False
    for name, value in params.items():
        text = overrides.get(name)
        if text is None:
            return False
        if isinstance(value, float):
            try:
                if float(text) != value:
                    return False
            except ValueError:
                return False
        elif text != str(value):
            return False
    return True
