"""`bigmodel train`: compose the config, build everything, run the Trainer, report."""

from __future__ import annotations

import errno
import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli import failed_start, run_lock
from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import TrainerConfig, plain_config, register_configs, trainer_settings
from bigmodel_cli.config_checks import validate_train_config
from bigmodel_cli.engine.files import WriteFailed
from bigmodel_cli.engine.layout_checks import check_layout, check_pipeline
from bigmodel_cli.error_report import report_user_errors
from bigmodel_cli.errors import Diverged, EXIT_INTERRUPTED, TrainingStopped, UserError, first_line
from bigmodel_cli.plan.show import show_plan
from bigmodel_cli.run_outcome import record_outcome

log = logging.getLogger("bigmodel")
register_configs()

# Files only a training run writes: finding one means the run dir is already taken.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "checkpoints")


def claim_run_dir(run_dir: Path, resume: str = "none") -> None:
    """A run dir is new, or (trainer.resume=auto) holds an unfinished run to continue.
    The caller holds its lock, so nothing else writes into it meanwhile."""
    from bigmodel_cli.engine.checkpoint_folder import CHECKPOINT_DIR, list_step_checkpoints

    taken = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if taken and resume == "auto":
        if list_step_checkpoints(run_dir / CHECKPOINT_DIR):
            return  # continued from its newest checkpoint
        if not (run_dir / "summary.json").exists():
            log.warning("run dir %s holds an unfinished run without checkpoints; starting it over", run_dir)
            return
    if taken:
        hint = ("; or continue it with trainer.resume=auto" if resume == "none"
                and list_step_checkpoints(run_dir / CHECKPOINT_DIR) else "")
        raise UserError(f"run dir {run_dir} already holds an earlier run ({', '.join(taken)}); "
                        f"leave hydra.run.dir at its default or pick a new one, so nothing is overwritten{hint}")
    run_dir.mkdir(parents=True, exist_ok=True)


def forget_earlier_outcome(run_dir: Path) -> None:
    """A run continued after it failed or stopped is no longer failed or stopped."""
    from bigmodel_cli.run_outcome import OUTCOME_FILE

    try:
        (run_dir / OUTCOME_FILE).unlink(missing_ok=True)
    except OSError as err:  # a read-only dir: the claim itself said what it could
        log.debug("could not remove %s: %s", run_dir / OUTCOME_FILE, err)


@contextmanager
def owned_run_dir(run_dir: Path, env, resume: str = "none", locked_by_parent: bool = False) -> Iterator[Path]:
    """Rank 0 locks and claims its run dir for the block, and every rank adopts it (under
    torchrun each rank ran Hydra on its own, and only rank 0's run dir is real). Workers of
    our launcher run under their parent's lock."""
    from bigmodel_cli.engine import distributed

    claimed: Any = str(run_dir)
    locked = False
    if env.is_main:
        try:
            if not locked_by_parent:
                run_lock.acquire(run_dir)
                locked = True
            claim_run_dir(run_dir, resume)
            forget_earlier_outcome(run_dir)
        except UserError as err:  # every rank learns of it, and stops
            claimed = err
    try:
        claimed = distributed.broadcast_from_main(claimed)
        if isinstance(claimed, UserError):
            raise claimed
        yield Path(claimed)
    finally:
        if locked:
            run_lock.release(run_dir)


@dataclass
class RankJob:
    """What every rank of a training run runs: the config, validated once by the process
    the user started (and handed to launched workers as it is)."""

    config: Dict[str, Any]  # plain (enums as strings): config.yaml and the checkpoints hold this
    settings: TrainerConfig  # config["trainer"], typed
    run_dir: Path
    choices: Dict[str, str] = field(default_factory=dict)
    overrides: List[str] = field(default_factory=list)
    locked_by_parent: bool = False  # a launched worker, whose parent holds the run dir's lock


def train(cfg: DictConfig, run_dir: Path, choices: Optional[Dict[str, str]] = None,
          overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary (also summary.json).
    `choices` are the group options picked (for messages: model=gpt, data=digits)."""
    from bigmodel_cli.engine import distributed  # torch loads here, after Hydra parsed argv (fast --help)

    validate_train_config(cfg)
    job = RankJob(OmegaConf.to_container(plain_config(cfg)), trainer_settings(cfg), Path(run_dir),
                  dict(choices or {}), list(overrides))
    env = distributed.detect()
    check_layout(job.settings, env, job.config.get("model", {}))
    check_pipeline(job.config, job.settings)
    if job.settings.devices > 1 and not env.is_distributed:
        return launch_workers(job)
    return run_rank(job, env)


def launch_workers(job: RankJob) -> Dict[str, Any]:
    """trainer.devices=N from one process: start N ranks, each running `run_worker`, while
    this process holds the run dir's lock for them."""
    from bigmodel_cli.engine.launch import launch

    t = job.settings
    check_devices(t)
    log.info("launching %d worker processes per node on %d node(s)", t.devices, t.num_nodes)
    # A worker that crashes leaves its traceback in the run dir's logs: keep them, unless
    # the workers report a user error from before training (below).
    failed_start.training_began(job.run_dir)
    with run_lock.holding(job.run_dir):
        try:
            results = launch(run_worker, (replace(job, locked_by_parent=True),), t.devices, t.num_nodes,
                             timeout_s=t.dist_timeout_s, run_dir=str(job.run_dir))
        except TrainingStopped as stop:  # before the workers could checkpoint
            raise TrainingStopped(f"{stop}; {how_to_continue(job.run_dir)}") from None
    result = results[0] if 0 in results else next(iter(results.values()))
    if result.error is not None:
        if not result.began:
            failed_start.training_began(job.run_dir, False)
        raise (Diverged if result.diverged else UserError)(result.error)
    if result.stopped is not None:
        raise TrainingStopped(result.stopped)
    return result.summary


def check_devices(settings: TrainerConfig) -> None:
    import os

    import torch

    from bigmodel_cli.engine.device import resolve_device

    device = resolve_device(settings.device)
    available = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    if settings.devices > available:
        kind = "CUDA devices" if device.type == "cuda" else "CPU cores"
        raise UserError(f"trainer.devices={settings.devices} but this machine has {available} {kind}; "
                        f"use trainer.devices={available} or fewer")


def how_to_continue(run_dir: Path) -> str:
    return f"continue with the same command plus hydra.run.dir={run_dir} trainer.resume=auto"


def run_worker(job: RankJob, link):
    """Entry point of a launched worker process (rank and world come from the environment).
    A user error or a stop comes back as a WorkerResult, so the parent reports it once;
    anything else is logged to this rank's log, told to the parent through `link` (a
    WorkerLink), and ends this worker with exit code 1, without a traceback on the console."""
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.engine.fit_result import WorkerResult
    from bigmodel_cli.engine.stopping import SIGNALS

    with SIGNALS.installed():
        # After the handlers: the parent forwards SIGUSR1 once this exists. It watches the
        # parent until this process ends (after returning, the worker still waits for the
        # parent to collect the result).
        watch = link.watch()
        try:
            return WorkerResult(summary=run_rank(job, distributed.detect()))
        except UserError as err:
            log.debug("error: %s", err)
            watch.failed(str(err), waiting=False)
            return WorkerResult(error=str(err), diverged=isinstance(err, Diverged),
                                began=failed_start.began(job.run_dir))
        except TrainingStopped as stop:
            return WorkerResult(stopped=str(stop))
        except KeyboardInterrupt:
            raise SystemExit(EXIT_INTERRUPTED) from None
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as err:  # Exception, and what libraries raise outside it (a Rust panic)
            log.debug("worker failed", exc_info=True)
            watch.failed(f"{type(err).__name__}: {first_line(err)}", detail=traceback.format_exc())
            raise SystemExit(1) from None


def run_rank(job: RankJob, env) -> Dict[str, Any]:
    """This process's part of the run: one rank of many, or the only one."""
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.engine.device import check_precision, resolve_device
    from bigmodel_cli.engine.stopping import SIGNALS
    from bigmodel_cli.build.training import Placement

    t = job.settings
    device = resolve_device(t.device)
    if env.is_distributed and device.type == "cuda":
        # One visible GPU per task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank): cuda:0.
        device = resolve_device("cuda:0" if torch_cuda_count() == 1 else f"cuda:{env.local_rank}")
    check_precision(t.precision, device)
    # From here on a stop signal is acted on between steps (or before the first one).
    with SIGNALS.installed() as signals:
        distributed.init(env, t.backend, device, t.dist_timeout_s)
        with owned_run_dir(job.run_dir, env, t.resume, job.locked_by_parent) as run_dir:
            try:
                return train_in_run_dir(replace(job, run_dir=run_dir), Placement(device, env, signals))
            except (WriteFailed, OSError) as err:
                if isinstance(err, OSError) and err.errno not in DISK_ERRORS:
                    raise
                raise disk_failure(err, run_dir) from None


# What a full, failing or read-only disk raises while the run writes its files.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def disk_failure(err: Exception, run_dir: Path) -> UserError:
    """One line: what could not be written and why, and the checkpoint to continue from."""
    from bigmodel_cli.engine.checkpoint_folder import CHECKPOINT_DIR, list_step_checkpoints
    from bigmodel_cli.error_report import describe_unexpected

    steps = list_step_checkpoints(run_dir / CHECKPOINT_DIR)
    kept = f"the last good checkpoint is {steps[-1][1]}" if steps else "no checkpoint was written"
    reason = str(err) if isinstance(err, UserError) else describe_unexpected(err)
    return UserError(f"{reason}; {kept}; free some space, then run the same command to continue")


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def train_in_run_dir(job: RankJob, place) -> Dict[str, Any]:
    """Build the run, fit, then test the best weights and report (or say how it stopped)."""
    from bigmodel_cli.build.training import build_run, rank_log

    rank_log(job.run_dir, place.env, place.device)
    run = build_run(OmegaConf.create(job.config), job.run_dir, job.choices, place, job.settings)
    failed_start.training_began(job.run_dir)  # from here on, a failure leaves the run dir as it is
    try:
        result = run.trainer.fit()
        if result.stopped is not None:
            requeue_if_asked(result.stopped, job.settings, place.env)
            raise TrainingStopped(stop_line(result.stopped, run.trainer.total_steps, job.run_dir))
        test, restored = final_test(run)
    finally:
        run.telemetry.close()
    return report(run, result, test, restored, job)


def requeue_if_asked(stopped, settings: TrainerConfig, env) -> None:
    """SIGUSR1 inside a Slurm job: the checkpoint is written; rank 0 asks Slurm to requeue."""
    from bigmodel_cli.engine.fit_result import StopAction
    from bigmodel_cli.engine.stopping import requeue
    from bigmodel_cli.slurm import slurm_job_id

    if stopped.action != StopAction.REQUEUE or not env.is_main:
        return
    try:
        requeue(settings.requeue_command, slurm_job_id())
    except UserError as err:  # the checkpoint is safe; say so and stop anyway
        log.error("error: %s", err)


def stop_line(stopped, total_steps: int, run_dir: Path) -> str:
    from bigmodel_cli.engine.fit_result import StopAction

    saved = f"checkpoint {stopped.checkpoint}" if stopped.checkpoint else "no new checkpoint"
    again = "the requeued job continues from it" if stopped.action == StopAction.REQUEUE else how_to_continue(run_dir)
    return f"{stopped.cause}: {stopped.action} at step {stopped.step} of {total_steps} with {saved}; {again}"


def final_test(run):
    """The test split on the best checkpoint's weights (else the final ones), logged and
    handed to the loggers with the hyperparameters."""
    from bigmodel_cli.engine.resume import flatten

    trainer = run.trainer
    restored = trainer.restore_best()
    test = trainer.evaluate("test", trainer.settings.eval_batches)
    run.telemetry.eval(trainer.step, "test", test)
    best = trainer.monitor.state_dict()
    final = {f"test/{k}": v for k, v in test.items()}
    if best["value"] is not None:
        final[f"best_{best['metric']}"] = best["value"]
    run.telemetry.finish(flatten(OmegaConf.to_container(run.config)), final)
    return test, restored


def report(run, result, test: Dict[str, float], restored: bool, job: RankJob) -> Dict[str, Any]:
    """summary.json and report.md (rank 0), and the closing line."""
    from bigmodel_cli.telemetry import write_json
    from bigmodel_cli.telemetry.report import write_report

    best = result.best
    elapsed = round(run.telemetry.elapsed(), 2)  # read once: report.md and `done in` show the same
    summary: Dict[str, Any] = {
        "monitor": best["metric"], "best_value": best["value"], "best_step": best["step"],
        "monitor_mode": "max" if run.trainer.monitor.maximize else "min",
        "test_uses": "best checkpoint" if restored else "final weights",
        "test": test, "final_val": result.val,
        "steps": result.steps, "epochs": result.epochs, "parameters": run.parameters,
        "elapsed_s": elapsed, "run_dir": str(job.run_dir),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "skipped_steps": result.skipped_steps, "overrides": list(job.overrides),
        "early_stop": result.early_stop,
        "device": str(run.trainer.device), "world_size": run.trainer.env.world_size,  # auto resolved
    }
    if run.trainer.env.is_main:
        write_json(job.run_dir / "summary.json", summary)
        write_report(job.run_dir, job.config, run.choices, summary)
    shown = " | ".join(f"test/{k} {v:.4f}" for k, v in test.items())
    best_value = f"{best['value']:.4f}" if best["value"] is not None else "n/a"
    log.info("done in %.1fs | %s | best %s %s at step %s | run dir %s", elapsed, shown,
             best["metric"], best_value, best["step"], job.run_dir)
    return summary


def dry_run(cfg: DictConfig, hydra_cfg) -> None:
    """trainer.dry_run=true: the plan, as `bigmodel plan` prints it; the run dir Hydra made goes."""
    from hydra.types import RunMode


    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        report_user_errors(lambda: show_plan(cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.overrides.task),
                           keep_going=hydra_cfg.mode == RunMode.MULTIRUN)
    finally:
        failed_start.discard_failed_start(run_dir)
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Returns the best monitored validation value, for sweepers (e.g. Optuna) to optimise.

    In a multirun a job that failed or diverged writes outcome.json and the sweep goes on;
    the sweep summary (bigmodel_cli/sweep_summary.py) lists it, and `bigmodel` exits
    non-zero if any failed.
    """
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if cfg.trainer.get("dry_run"):  # reached past cli.py (set by an experiment, or in a sweep)
        return dry_run(cfg, hydra_cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    ended: List[str] = []

    def record(status: str, reason: str) -> None:
        ended.append(status)
        record_outcome(run_dir, status, reason)

    summary = report_user_errors(
        lambda: train(cfg, run_dir, dict(hydra_cfg.runtime.choices), hydra_cfg.overrides.task),
        keep_going=hydra_cfg.mode == RunMode.MULTIRUN, run_dir=run_dir, record=record)
    if summary is None:
        return sweep_value_of_failure(cfg, ended)
    if summary["best_value"] is not None:
        return summary["best_value"]
    return summary["final_val"].get(summary["monitor"].split("/", 1)[1])


def sweep_value_of_failure(cfg: DictConfig, ended: List[str]) -> Optional[float]:
    """What a sweeper hears from a job that gave no result. Diverged: the worst value (inf
    when minimising), so that Optuna learns to avoid that region and a study whose every
    trial diverged still has a best one. Failed: None, which Optuna records as a failed
    trial and goes on from (NaN would end the study)."""
    from bigmodel_cli.run_outcome import DIVERGED
    from bigmodel_cli.telemetry.run_files import direction

    if DIVERGED not in ended:
        return None
    trainer = cfg.get("trainer") or {}
    maximize = direction(trainer.get("monitor", "val/loss"), trainer.get("monitor_mode", "auto")) == "maximize"
    return float("-inf") if maximize else float("inf")
