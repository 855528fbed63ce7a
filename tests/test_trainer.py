"""The Trainer on its own: built by hand from parts, without the train command or Hydra."""

from __future__ import annotations

import pytest
import json

import torch
from torch import nn

from bigmodel_cli.build.training import build_run
from bigmodel_cli.config import ProgressMode, TrainerConfig
from bigmodel_cli.data.synthetic import Synthetic
from bigmodel_cli.engine.checkpoint import Provenance, load_checkpoint
from bigmodel_cli.engine.fit_result import FitResult, StopAction, StopCause
from bigmodel_cli.engine.tasks import task_for
from bigmodel_cli.engine.trainer import RunContext, Trainer, TrainingParts
from bigmodel_cli.signals import STOP
from bigmodel_cli.telemetry import Telemetry

pytestmark = pytest.mark.integration


def constant_schedule(total_steps: int):
    return lambda step: 1.0


def hand_built_trainer(run_dir, **settings) -> Trainer:
    torch.manual_seed(0)
    data = Synthetic(batch_size=32, num_samples=512, input_shape=(8,), num_classes=3, noise=0.3)
    data.setup()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    parts = TrainingParts(model, torch.optim.Adam(model.parameters(), lr=1e-2), constant_schedule, data,
                          task_for("classification"))
    typed = TrainerConfig(max_steps=12, log_every=4, val_every=6, progress=ProgressMode.plain, **settings)
    # What built it, for its checkpoints (a config tree of the sections eval rebuilds from).
    origin = Provenance({"model": {"hidden": 32}, "data": {"num_samples": 512}, "trainer": {}}, {}, {}, data.spec)
    return Trainer(parts, typed, RunContext(run_dir, Telemetry(run_dir, "plain"), provenance=origin))


def test_a_hand_built_trainer_steps_evaluates_and_checkpoints(tmp_path):
    trainer = hand_built_trainer(tmp_path)
    assert trainer.total_steps == 12
    result = trainer.fit()
    trainer.telemetry.close()
    assert isinstance(result, FitResult) and result.stopped is None
    assert result.steps == trainer.step == 12
    assert result.val["accuracy"] > 0.5  # three well separated clusters
    assert result.best["metric"] == "val/loss" and result.best["step"] in (6, 12)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [4, 8, 12]
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last.step == 12 and last.spec == trainer.data.spec and last.world_size == 1
    assert set(last.model) == set(trainer.raw_model.state_dict())


def test_a_stop_request_ends_the_fit_with_a_typed_outcome(tmp_path):
    trainer = hand_built_trainer(tmp_path)
    trainer.signals.request, trainer.signals.signal_name = STOP, "SIGTERM"  # as the handler records it
    result = trainer.fit()
    trainer.telemetry.close()
    assert result.stopped is not None and result.steps == 0
    assert result.stopped.cause == StopCause.SIGTERM and result.stopped.action == StopAction.STOP_AT_START


def test_build_run_gives_a_trainer_from_a_config(compose, tmp_path):
    cfg = compose("data=synthetic", "model=mlp", "trainer.max_steps=3", "trainer.progress=plain",
                  "trainer.val_at_start=false")
    run = build_run(cfg, tmp_path, {"model": "mlp", "data": "synthetic"})
    try:
        assert isinstance(run.trainer.settings, TrainerConfig)
        assert run.trainer.settings.precision.value == "fp32"  # typed: an enum, not a string
        assert run.trainer.fit().steps == 3
    finally:
        run.telemetry.close()
    assert (tmp_path / "config.yaml").is_file()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt").choices == {"model": "mlp", "data": "synthetic"}
