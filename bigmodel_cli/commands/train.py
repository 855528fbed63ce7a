"""`bigmodel train`: compose the config, build everything, run the Trainer, report."""

from __future__ import annotations

import errno
import logging
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli import run_lock
from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import plain_config, register_configs, validate_train_config
from bigmodel_cli.engine.files import WriteFailed
from bigmodel_cli.errors import EXIT_INTERRUPTED, TrainingStopped, UserError, first_line, report_user_errors

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


def launch_workers(cfg: DictConfig, run_dir: Path, choices: Dict[str, str], overrides: Sequence[str]) -> Dict[str, Any]:
    """trainer.devices=N from one process: start N ranks, each running `run_worker`, while
    this process holds the run dir's lock for them."""
    import os

    import torch

    from bigmodel_cli.engine.device import resolve_device
    from bigmodel_cli.engine.launch import launch

    t = cfg.trainer
    device = resolve_device(t.device)
    available = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    if t.devices > available:
        kind = "CUDA devices" if device.type == "cuda" else "CPU cores"
        raise UserError(f"trainer.devices={t.devices} but this machine has {available} {kind}; "
                        f"use trainer.devices={available} or fewer")
    log.info("launching %d worker processes per node on %d node(s)", t.devices, t.num_nodes)
    with run_lock.holding(run_dir):
        try:
            results = launch(run_worker, (OmegaConf.to_container(cfg), str(run_dir), choices, list(overrides)),
                             t.devices, t.num_nodes, timeout_s=t.dist_timeout_s, run_dir=str(run_dir))
        except TrainingStopped as stop:  # before the workers could checkpoint
            raise TrainingStopped(f"{stop}; {how_to_continue(run_dir)}") from None
    result = results[0] if 0 in results else next(iter(results.values()))
    if isinstance(result, dict) and "error" in result:
        raise UserError(result["error"])
    if isinstance(result, dict) and "stopped" in result:
        raise TrainingStopped(result["stopped"])
    return result


def how_to_continue(run_dir: Path) -> str:
    return f"continue with the same command plus hydra.run.dir={run_dir} trainer.resume=auto"


def run_worker(cfg: Dict[str, Any], run_dir: str, choices: Dict[str, str], overrides: Sequence[str], link):
    """Entry point of a launched worker process (rank and world come from the environment).
    A user error or a stop comes back as a value, so the parent reports it once; anything
    else is logged to this rank's log, told to the parent through `link` (a WorkerLink),
    and ends this worker with exit code 1, without a traceback on the console."""
    from bigmodel_cli.engine.stopping import SIGNALS

    with SIGNALS.installed():
        # After the handlers: the parent forwards SIGUSR1 once this exists. It watches the
        # parent until this process ends (after returning, the worker still waits for the
        # parent to collect the result).
        watch = link.watch()
        try:
            return train(OmegaConf.create(cfg), Path(run_dir), choices, overrides, locked_by_parent=True)
        except UserError as err:
            log.debug("error: %s", err)
            watch.failed(str(err), waiting=False)
            return {"error": str(err)}
        except TrainingStopped as stop:
            return {"stopped": str(stop)}
        except KeyboardInterrupt:
            raise SystemExit(EXIT_INTERRUPTED) from None
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as err:  # Exception, and what libraries raise outside it (a Rust panic)
            log.debug("worker failed", exc_info=True)
            watch.failed(f"{type(err).__name__}: {first_line(err)}", detail=traceback.format_exc())
            raise SystemExit(1) from None


def train(cfg: DictConfig, run_dir: Path, choices: Optional[Dict[str, str]] = None,
          overrides: Sequence[str] = (), locked_by_parent: bool = False) -> Dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary (also summary.json).

    `choices` are the group options picked (for messages: model=gpt, data=digits).
    `locked_by_parent`: a launched worker, whose parent holds the run dir's lock.
    """
    # torch and the engine load here, after Hydra has parsed argv (fast --help).
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.engine.device import check_precision, resolve_device

    validate_train_config(cfg)
    cfg = plain_config(cfg)
    choices = choices or {}
    t = cfg.trainer
    env = distributed.detect()
    if t.devices > 1 and not env.is_distributed:
        return launch_workers(cfg, run_dir, choices, overrides)
    device = resolve_device(t.device)
    if env.is_distributed and device.type == "cuda":
        # One visible GPU per task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank): cuda:0.
        device = resolve_device("cuda:0" if torch_cuda_count() == 1 else f"cuda:{env.local_rank}")
    check_precision(t.precision, device)
    if t.precision == "fp16" and t.strategy == "fsdp":
        raise UserError("trainer.precision=fp16 with trainer.strategy=fsdp is not supported (per-shard loss "
                        "scaling would let ranks diverge); use trainer.precision=bf16")
    from bigmodel_cli.engine.stopping import SIGNALS

    # From here on a stop signal is acted on between steps (or before the first one).
    with SIGNALS.installed() as signals:
        distributed.init(env, t.backend, device, t.dist_timeout_s)
        with owned_run_dir(run_dir, env, t.resume, locked_by_parent) as run_dir:
            try:
                return train_in_run_dir(cfg, run_dir, choices, overrides, env, device, signals)
            except (WriteFailed, OSError) as err:
                if isinstance(err, OSError) and err.errno not in DISK_ERRORS:
                    raise
                raise disk_failure(err, run_dir) from None


# What a full, failing or read-only disk raises while the run writes its files.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def disk_failure(err: Exception, run_dir: Path) -> UserError:
    """One line: what could not be written and why, and the checkpoint to continue from."""
    from bigmodel_cli.engine.checkpoint_folder import CHECKPOINT_DIR, list_step_checkpoints
    from bigmodel_cli.errors import describe_unexpected

    steps = list_step_checkpoints(run_dir / CHECKPOINT_DIR)
    kept = f"the last good checkpoint is {steps[-1][1]}" if steps else "no checkpoint was written"
    reason = str(err) if isinstance(err, UserError) else describe_unexpected(err)
    return UserError(f"{reason}; {kept}; free some space, then run the same command to continue")


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def train_in_run_dir(cfg: DictConfig, run_dir: Path, choices: Dict[str, str], overrides: Sequence[str],
                     env, device, signals) -> Dict[str, Any]:
    import os

    import torch

    from bigmodel_cli.build import (build_data, build_model, build_optimizer, check_model_fits,
                                    count_parameters, human_count, instantiate_or_explain)
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.engine.device import seed_everything, use_tf32
    from bigmodel_cli.engine.resume import config_changes, flatten, load_initial_weights, starting_checkpoint
    from bigmodel_cli.engine.tasks import task_for
    from bigmodel_cli.engine.checkpoint import Provenance
    from bigmodel_cli.engine.trainer import Trainer
    from bigmodel_cli.telemetry import Telemetry, write_json
    from bigmodel_cli.telemetry.efficiency import model_flops_per_token
    from bigmodel_cli.telemetry.report import write_report
    from bigmodel_cli.telemetry.console import attach_rank_log

    t = cfg.trainer
    if env.is_distributed:
        attach_rank_log(run_dir, env.rank, console=env.is_main)
        log.info("rank %d of %d (%s), pid %d, device %s", env.rank, env.world_size, env.source, os.getpid(), device)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg).rstrip())
    start = starting_checkpoint(t.resume, run_dir, env)
    start_path = start.path if start is not None else None
    if start is not None:
        changes = config_changes(start.config, OmegaConf.to_container(cfg))
        if changes:
            log.info("resuming with changed settings: %s", "; ".join(changes))
    if env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    seed_everything(t.seed, t.deterministic)
    use_tf32(t.tf32, device)

    data = build_data(cfg.data)
    log.info("data: %s", data.describe())
    data_state = data.state_dict()
    if data_state.get("vocab") is not None and env.is_main:
        write_json(run_dir / "vocab.json", data_state["vocab"])
    spec = data.spec
    names = {k: choices.get(k, "") for k in ("model", "data")}
    model = build_model(cfg.model, spec, names["model"], names["data"])
    check_model_fits(model, data, spec.task)
    n_params = count_parameters(model)
    log.info("model: %s with %s parameters (%s)", type(model).__name__, f"{n_params:,}", human_count(n_params))

    model.to(device)
    data.to(device)
    # Parallelize before the optimizer sees the parameters: FSDP replaces them with shards.
    model = distributed.parallelize(model, t.strategy, env, device, t.precision)
    if env.is_distributed:  # same initial weights everywhere, but each rank its own dropout
        torch.manual_seed(t.seed + 1_000_003 * env.rank)
    optimizer = build_optimizer(cfg.optim, model)
    if t.compile:  # after the optimizer: it must see the real parameters, not the wrapper's
        model = torch.compile(model)
    schedule_factory = partial(instantiate_or_explain, cfg.scheduler, "scheduler")
    # Records past the checkpoint are about to be redone (a fresh start redoes them all).
    telemetry = Telemetry(run_dir, t.progress, active=env.is_main, loggers=cfg.get("logger"),
                          resume_step=start.step if start is not None else 0)
    try:
        trainer = Trainer(model, optimizer, schedule_factory, data, task_for(spec.task), t, device, run_dir,
                          telemetry, Provenance(OmegaConf.to_container(cfg), names, data_state, spec), env=env, signals=signals,
                          flops_per_unit=model_flops_per_token(model, cfg.model, spec.task, spec.block_size,
                                                               n_params))
        if start is not None:
            trainer.load_checkpoint(start)
            start = None  # the loaded copy is the trainer's now: free the checkpoint's memory
            log.info("resuming from %s at step %d of %d", start_path, trainer.step, trainer.total_steps)
        elif t.init_from:
            source = load_initial_weights(distributed.unwrap(model), t.init_from)
            log.info("weights from %s; optimizer and step start fresh", source)
        log.info("plan: %s", trainer.describe())
        result = trainer.fit()
        stopped = result["stopped"]
        if not stopped:
            restored = trainer.restore_best()
            test = trainer.evaluate("test", t.eval_batches)
            telemetry.eval(trainer.step, "test", test)
            best = result["best"]
            final = {f"test/{k}": v for k, v in test.items()}
            if best["value"] is not None:
                final[f"best_{best['metric']}"] = best["value"]
            telemetry.finish(flatten(OmegaConf.to_container(cfg)), final)
    finally:
        telemetry.close()
    if stopped:
        saved = f"checkpoint {stopped['checkpoint']}" if stopped["checkpoint"] else "no new checkpoint"
        again = ("the requeued job continues from it" if "requeued" in stopped["action"] else
                 how_to_continue(run_dir))
        raise TrainingStopped(f"{stopped['cause']}: {stopped['action']} at step {stopped['step']} of "
                              f"{trainer.total_steps} with {saved}; {again}")

    best = result["best"]
    summary: Dict[str, Any] = {
        "monitor": best["metric"], "best_value": best["value"], "best_step": best["step"],
        "test_uses": "best checkpoint" if restored else "final weights",
        "test": test, "final_val": result["val"],
        "steps": result["steps"], "epochs": result["epochs"], "parameters": n_params,
        "elapsed_s": round(telemetry.elapsed(), 2), "run_dir": str(run_dir),
        "resumed_from": str(start_path) if start_path else None, "skipped_steps": result["skipped_steps"],
        "overrides": list(overrides),
    }
    if env.is_main:
        write_json(run_dir / "summary.json", summary)
        write_report(run_dir, OmegaConf.to_container(cfg), names, summary)
    shown = " | ".join(f"test/{k} {v:.4f}" for k, v in test.items())
    best_value = f"{best['value']:.4f}" if best["value"] is not None else "n/a"
    log.info("done in %.1fs | %s | best %s %s at step %s | run dir %s", telemetry.elapsed(), shown,
             best["metric"], best_value, best["step"], run_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Returns the best monitored validation value, for sweepers (e.g. Optuna) to optimise.

    In a multirun a failed job reports NaN and the sweep goes on; `bigmodel` then exits
    non-zero once the sweep is over.
    """
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    summary = report_user_errors(
        lambda: train(cfg, Path(hydra_cfg.runtime.output_dir), dict(hydra_cfg.runtime.choices),
                      hydra_cfg.overrides.task),
        keep_going=hydra_cfg.mode == RunMode.MULTIRUN,
        job=" ".join(hydra_cfg.overrides.task))
    if summary is None:
        return float("nan")
    if summary["best_value"] is not None:
        return summary["best_value"]
    return summary["final_val"].get(summary["monitor"].split("/", 1)[1])
