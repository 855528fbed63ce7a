"""The training loop, run in-process on tiny problems."""

import json
from pathlib import Path

import pytest
import torch

from bigmodel_cli.commands.train import train
from bigmodel_cli.engine.checkpoint import load_checkpoint
from bigmodel_cli.errors import UserError

pytestmark = pytest.mark.integration

TINY = ("data=synthetic", "data.num_samples=512", "model.hidden_sizes=[32]", "model.dropout=0.0",
        "trainer.log_every=5", "trainer.val_every=10", "trainer.progress=plain")


def test_training_lowers_the_loss_and_writes_the_run_dir(compose, tmp_path):
    cfg = compose(*TINY, "trainer.max_steps=40")
    summary = train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0]
    first = next(r for r in records if "loss" in r)
    assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"} <= first.keys()
    val_steps = [r["step"] for r in records if "val/loss" in r]
    assert val_steps == [0, 10, 20, 30, 40]
    assert summary["steps"] == 40 and summary["test"]["accuracy"] > 0.5
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "config.yaml").is_file()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt.step == 40
    assert ckpt.model and ckpt.optimizer and ckpt.scheduler and ckpt.best and ckpt.spec.task == "classification"
    assert ckpt.config["model"]["hidden_sizes"] == [32]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_best_checkpoint_follows_the_monitor(compose, tmp_path):
    cfg = compose(*TINY, "trainer.max_steps=30", "trainer.monitor=val/accuracy")
    summary = train(cfg, tmp_path)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accs = {r["step"]: r["val/accuracy"] for r in records if "val/accuracy" in r and r["step"] > 0}
    best_step = max(accs, key=lambda s: (accs[s], -s))
    assert best.step == summary["best_step"] == best_step
    assert summary["best_value"] == pytest.approx(accs[best_step])


def final_weights(compose, tmp_path, *overrides):
    cfg = compose(*TINY, "trainer.max_steps=1", "trainer.grad_clip=null", "trainer.val_at_start=false",
                  "scheduler=constant", *overrides)
    torch.manual_seed(0)
    train(cfg, tmp_path)
    return load_checkpoint(tmp_path / "checkpoints" / "last.pt").model


def test_gradient_accumulation_matches_a_larger_batch(compose, tmp_path):
    accumulated = final_weights(compose, tmp_path / "a", "data.batch_size=16", "trainer.grad_accum_steps=2")
    large = final_weights(compose, tmp_path / "b", "data.batch_size=32")
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-5, atol=1e-6)


def test_max_epochs_limits_the_run(compose, tmp_path):
    cfg = compose(*TINY, "trainer.max_steps=null", "trainer.max_epochs=2", "data.batch_size=64")
    summary = train(cfg, tmp_path)
    assert summary["epochs"] == pytest.approx(2.0)
    assert summary["steps"] == 2 * (int(512 * 0.8) // 64)


def test_diverging_loss_stops_with_a_clear_error(compose, tmp_path):
    cfg = compose(*TINY, "optim=sgd", "optim.lr=1e12", "trainer.grad_clip=null", "trainer.max_steps=20",
                  "data.task=regression")
    with pytest.raises(UserError, match="non-finite|became (nan|inf)"):
        train(cfg, tmp_path)


def test_bf16_autocast_trains_on_cpu(compose, tmp_path):
    summary = train(compose(*TINY, "trainer.max_steps=10", "trainer.precision=bf16"), tmp_path)
    assert summary["steps"] == 10


def test_same_seed_same_run(compose, tmp_path):
    a = train(compose(*TINY, "trainer.max_steps=15", "trainer.deterministic=true"), tmp_path / "a")
    b = train(compose(*TINY, "trainer.max_steps=15", "trainer.deterministic=true"), tmp_path / "b")
    torch.use_deterministic_algorithms(False)
    assert a["test"] == b["test"]


def test_long_warmup_is_shortened_for_short_runs(compose, tmp_path, caplog):
    train(compose(*TINY, "trainer.max_steps=20", "scheduler.warmup_steps=100"), tmp_path)
    assert "warming up for 2 steps" in caplog.text


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_runs_on_a_tiny_budget(compose, tmp_path, name):
    cfg = compose(f"experiment={name}", "trainer.max_steps=3", "trainer.eval_batches=2", "trainer.progress=plain")
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 3
