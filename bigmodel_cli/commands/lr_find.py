"""`bigmodel lr-find`: an LR range test on the model, data and optimizer that `bigmodel
train` with the same overrides would build; prints the suggested lr as an override.

The run is built by build/training.py's build_run from train's config, changed only where the test must
differ (engine/lr_range.py has the arithmetic):
- optim.lr is the test's first lr and the scheduler is the test's geometric ramp, which
  the Trainer's own LambdaLR steps; the optimizer's other settings stay as configured;
- trainer.max_steps is lr_find.num_steps; no checkpoints, no metric files, no resume
  (the test starts from fresh weights, or trainer.init_from's);
- one process: trainer.devices x num_nodes ranks become as many accumulation steps, so
  the test sees the same global batch per step as the distributed run would.
Each step is one call of Trainer.train_step (autocast, accumulation, clipping, loss
scaling as in training). It writes lr_find.json and lr_find.png into a new dir
(outputs/lr_find/<date>/<time>; never an existing run dir) and leaves no checkpoint.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli import failed_start
from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import LrFindConfig, register_configs, trainer_settings
from bigmodel_cli.config_checks import validate_lr_find, validate_train_config
from bigmodel_cli.config_keys import TRAIN_KEYS
from bigmodel_cli.engine.lr_range import RangeTest, Suggestion, as_override, suggest
from bigmodel_cli.error_report import report_user_errors
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")
register_configs()
#: train's config, and the range test's own settings
KEYS = (*TRAIN_KEYS, "lr_find")

RAMP_TARGET = "bigmodel_cli.engine.lr_range.ExponentialRamp"
#: how the suggestion is read off the curve (engine/lr_range.suggest says why)
RULE = "steepest fall of the smoothed loss per decade of lr, below its lowest point"


def settings_of(cfg: DictConfig) -> LrFindConfig:
    validate_lr_find(cfg)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LrFindConfig), cfg.lr_find))


def train_part(cfg: DictConfig) -> DictConfig:
    """The config `bigmodel train` would have got: everything but lr_find, validated as train does."""
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "lr_find"])
    validate_train_config(train_cfg)
    return train_cfg


def probe_config(train_cfg: DictConfig, f: LrFindConfig) -> DictConfig:
    """train's config with the changes the range test needs (see the module docstring)."""
    plain: Dict[str, Any] = OmegaConf.to_container(train_cfg, resolve=True, enum_to_str=True)
    plain["optim"]["lr"] = f.min_lr
    plain["scheduler"] = {"_target_": RAMP_TARGET, "ratio": f.max_lr / f.min_lr}
    plain["logger"] = {}  # lr_find.json holds the curve
    t = plain["trainer"]
    ranks = replicas(t)
    if ranks > 1:
        log.info("lr-find runs in one process: trainer.devices=%d x num_nodes=%d ranks become %d x more "
                 "accumulation steps, the same global batch per step", t["devices"], t["num_nodes"], ranks)
    if t["resume"] not in ("auto", "none"):
        log.info("lr-find starts from fresh weights, not trainer.resume=%s (trainer.init_from=<checkpoint> "
                 "starts it from a run's weights)", t["resume"])
    t.update(grad_accum_steps=t["grad_accum_steps"] * ranks, devices=1, num_nodes=1, max_steps=f.num_steps,
             max_epochs=None, save_checkpoints=False, resume="none")
    return OmegaConf.create(plain)


def replicas(t: Dict[str, Any]) -> int:
    """The data-parallel replicas of the train run, each reading its own batch. A model split by
    trainer.parallel (tp, pp) runs whole here: its ranks compute one process's numbers."""
    from bigmodel_cli.config import ParallelConfig
    from bigmodel_cli.engine.mesh import layout_for

    parallel = t.get("parallel") or {}
    layout = layout_for(t["devices"] * t["num_nodes"], ParallelConfig(tp=parallel.get("tp", 1), pp=parallel.get("pp", 1)))
    if layout.splits_model:
        log.info("lr-find runs the model whole in one process (trainer.parallel tp=%d x pp=%d compute the same "
                 "numbers)", layout.tp, layout.pp)
        t["parallel"] = {**parallel, "tp": 1, "pp": 1}
    return layout.dp


def refuse_what_train_refuses(train_cfg: DictConfig) -> None:
    """The train command lr-find suggests must start: its layout and model split as train checks."""
    from bigmodel_cli.engine.layout_checks import check_layout, check_pipeline
    from bigmodel_cli.engine.distributed import DistEnv

    config = OmegaConf.to_container(train_cfg, resolve=True, enum_to_str=True)
    check_layout(trainer_settings(train_cfg), DistEnv(), config.get("model") or {})
    check_pipeline(config, trainer_settings(train_cfg))


def lr_find(cfg: DictConfig, run_dir: Path, choices: Dict[str, str], overrides: Sequence[str]) -> Dict[str, Any]:
    """Run the range test into `run_dir`; returns what lr_find.json holds."""
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.engine.device import check_precision, resolve_device
    from bigmodel_cli.build.training import Placement, build_run

    env = distributed.detect()
    if env.is_distributed:  # each rank would run its own test (and all but rank 0 have no dir)
        raise UserError(f"lr-find runs in one process, not as one of {env.world_size} {env.source} ranks; start "
                        "it on its own: trainer.devices=N becomes N x the accumulation, the same global batch")
    f = settings_of(cfg)
    train_cfg = train_part(cfg)
    refuse_what_train_refuses(train_cfg)
    probe = probe_config(train_cfg, f)
    settings = trainer_settings(probe)
    device = resolve_device(settings.device)
    check_precision(settings.precision, device)
    run = build_run(probe, run_dir, choices, Placement(device), settings)
    failed_start.training_began(run_dir)  # from here on a failure keeps the dir and its log
    try:
        test = range_test(run.trainer, f)
    finally:
        run.telemetry.close()
    found = suggest(test.lrs, test.smoothed)
    result = results(test, found, f, overrides, str(run.trainer.device))
    write_results(run_dir, result, found)
    if found is None:
        raise UserError(f"no suggestion: the smoothed loss never fell over the {len(test.lrs)} steps from "
                        f"lr {f.min_lr:g} ({test.stop_reason or 'to the end'}); lower lr_find.min_lr or raise "
                        f"lr_find.num_steps; the curve is in {run_dir / 'lr_find.png'}")
    announce(found, test, overrides, run_dir)
    return result


def range_test(trainer, f: LrFindConfig) -> RangeTest:
    """Optimizer steps at rising lrs until the ramp ends or the loss diverges."""
    test = RangeTest(beta=f.smoothing, diverge_factor=f.diverge_factor)
    every = max(1, trainer.total_steps // 10)
    trainer.model.train()
    batches = trainer.micro_batches()
    try:
        while trainer.step < trainer.total_steps:
            loss, _ = trainer.train_step(batches, want_grad_norm=False)
            trainer.step += 1
            # The test needs every step's loss on the host: one sync per step, by design
            # (training itself reads it only at log steps).
            stop = test.add(trainer.last_lr, loss.item())
            if stop or trainer.step % every == 0:
                shown = f"{test.smoothed[-1]:.4g}" if test.smoothed else "n/a"
                log.info("lr-find step %d/%d | lr %.3g | smoothed loss %s", trainer.step, trainer.total_steps,
                         trainer.last_lr, shown)
            if stop:
                log.info("stopped: %s", test.stop_reason)
                break
    finally:
        batches.close()  # ends a background prefetch thread, if the loader has one
    return test


def results(test: RangeTest, found: Optional[Suggestion], f: LrFindConfig, overrides: Sequence[str],
            device: str) -> Dict[str, Any]:
    suggestion = None if found is None else {
        "lr": found.lr, "override": as_override(found.lr), "rule": RULE, "step": found.index + 1,
        "min_loss_lr": found.min_loss_lr}
    return {"suggestion": suggestion, "stop_reason": test.stop_reason, "steps": len(test.lrs),
            "lrs": test.lrs, "losses": test.losses, "smoothed": test.smoothed,
            "settings": {"min_lr": f.min_lr, "max_lr": f.max_lr, "num_steps": f.num_steps,
                         "smoothing": f.smoothing, "diverge_factor": f.diverge_factor},
            "overrides": list(overrides), "device": device}


def write_results(run_dir: Path, result: Dict[str, Any], found: Optional[Suggestion]) -> None:
    from bigmodel_cli.telemetry import write_json
    from bigmodel_cli.telemetry.lr_find_plot import plot_lr_find

    write_json(run_dir / "lr_find.json", result)
    plot_lr_find(result["lrs"], result["smoothed"], result["losses"], found, run_dir / "lr_find.png")


def announce(found: Suggestion, test: RangeTest, overrides: Sequence[str], run_dir: Path) -> None:
    """The suggestion as an override, the train command it completes, and where the files are."""
    override = as_override(found.lr)
    # The user's own overrides, less the range test's settings and any lr they gave.
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("lr_find.", "optim.lr="))]
    print(f"lr-find: {len(test.lrs)} steps; the smoothed loss fell fastest at lr {found.lr:.3g} and was "
          f"lowest at lr {found.min_loss_lr:.3g}", flush=True)
    print(f"suggested: {override}", flush=True)
    print(f"  bigmodel train {shlex.join([*kept, override])}", flush=True)
    print(f"written: {run_dir} (lr_find.png, lr_find.json)", flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lr_find")
def main(cfg: DictConfig) -> Optional[float]:
    """Returns the suggested lr (NaN when there is none), for a sweep over range tests."""
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    result = report_user_errors(
        lambda: lr_find(cfg, run_dir, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task)),
        keep_going=hydra_cfg.mode == RunMode.MULTIRUN, run_dir=run_dir)
    suggestion = (result or {}).get("suggestion")
    return suggestion["lr"] if suggestion else math.nan
