"""`bigmodel train`: compose the config, build everything, run the Trainer, report."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import plain_config, register_configs, validate_train_config
from bigmodel_cli.errors import UserError, report_user_errors

log = logging.getLogger("bigmodel")
register_configs()

# Files only a training run writes: finding one means the run dir is already taken.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "checkpoints")


def claim_run_dir(run_dir: Path) -> None:
    taken = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if taken:
        raise UserError(f"run dir {run_dir} already holds an earlier run ({', '.join(taken)}); "
                        "leave hydra.run.dir at its default or pick a new one, so nothing is overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)


def train(cfg: DictConfig, run_dir: Path, choices: Optional[Dict[str, str]] = None,
          overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary (also summary.json).

    `choices` are the group options picked (for messages: model=gpt, data=digits).
    """
    # torch and the engine load here, after Hydra has parsed argv (fast --help).
    from bigmodel_cli.build import (build_data, build_model, build_optimizer, check_model_fits,
                                    count_parameters, human_count, instantiate_or_explain)
    from bigmodel_cli.engine.device import check_precision, resolve_device, seed_everything
    from bigmodel_cli.engine.tasks import task_for
    from bigmodel_cli.engine.trainer import Trainer
    from bigmodel_cli.telemetry import Telemetry, write_json

    validate_train_config(cfg)
    cfg = plain_config(cfg)
    claim_run_dir(run_dir)
    choices = choices or {}
    log.info("config:\n%s", OmegaConf.to_yaml(cfg).rstrip())
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")

    t = cfg.trainer
    device = resolve_device(t.device)
    check_precision(t.precision, device)
    seed_everything(t.seed, t.deterministic)

    data = build_data(cfg.data)
    log.info("data: %s", data.describe())
    data_state = data.state_dict()
    if data_state.get("vocab") is not None:
        write_json(run_dir / "vocab.json", data_state["vocab"])
    spec = data.spec
    names = {k: choices.get(k, "") for k in ("model", "data")}
    model = build_model(cfg.model, spec, names["model"], names["data"])
    check_model_fits(model, data, spec.task)
    n_params = count_parameters(model)
    log.info("model: %s with %s parameters (%s)", type(model).__name__, f"{n_params:,}", human_count(n_params))

    model.to(device)
    data.to(device)
    optimizer = build_optimizer(cfg.optim, model)
    schedule_factory = partial(instantiate_or_explain, cfg.scheduler, "scheduler")
    telemetry = Telemetry(run_dir, t.progress)
    try:
        trainer = Trainer(model, optimizer, schedule_factory, data, task_for(spec.task), t, device, run_dir,
                          telemetry, checkpoint_extra={
                              "config": OmegaConf.to_container(cfg),
                              "choices": names,
                              "data": data_state,
                              "spec": asdict(spec),
                          })
        log.info("plan: %s", trainer.describe())
        result = trainer.fit()
        restored = trainer.restore_best()
        test = trainer.evaluate("test", t.eval_batches)
        telemetry.eval(trainer.step, "test", test)
    finally:
        telemetry.close()

    best = result["best"]
    summary: Dict[str, Any] = {
        "monitor": best["metric"], "best_value": best["value"], "best_step": best["step"],
        "test_uses": "best checkpoint" if restored else "final weights",
        "test": test, "final_val": result["val"],
        "steps": result["steps"], "epochs": result["epochs"], "parameters": n_params,
        "elapsed_s": round(telemetry.elapsed(), 2), "run_dir": str(run_dir),
        "overrides": list(overrides),
    }
    write_json(run_dir / "summary.json", summary)
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
