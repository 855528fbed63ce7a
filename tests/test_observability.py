"""Loggers, throughput figures, plots and reports."""

import csv
import json

import pytest

from bigmodel_cli.commands.train import train

QUICK = ("trainer.max_steps=20", "trainer.log_every=5", "trainer.val_every=10", "trainer.progress=plain")


def test_tensorboard_events_read_back_with_the_right_steps(compose, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    train(compose(*QUICK), tmp_path)  # the default loggers include TensorBoard
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/lr", "train/samples_per_s", "train/grad_norm",
            "test/accuracy"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in events.Scalars("val/loss")] == [0, 10, 20]
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in jsonl if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)


def test_csv_has_one_row_per_record_and_a_column_per_metric(compose, tmp_path):
    train(compose(*QUICK), tmp_path)  # jsonl, csv and tensorboard are the default loggers
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(jsonl)
    assert {"step", "loss", "lr", "val/loss", "val/accuracy", "test/accuracy"} <= set(rows[0])
    assert [float(r["loss"]) for r in rows if r["loss"]] == [r["loss"] for r in jsonl if "loss" in r]


def test_throughput_memory_and_no_mfu_on_cpu(compose, tmp_path):
    train(compose(*QUICK, "model=gpt", "data=text", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                  "trainer.eval_batches=2", "trainer.device=cpu"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    for record in train_records:
        assert record["tokens_per_s"] > 0 and record["step_ms"] > 0 and record["peak_mem_mb"] > 10
        assert 0 <= record["data_wait"] < 1
        assert "mfu" not in record  # CPU: no peak to compare with, so nothing is made up


def test_mfu_estimate_and_peak_table():
    import torch

    from bigmodel_cli.telemetry.efficiency import peak_flops, transformer_flops_per_token

    # GPT-2 small, 124M parameters (85M without embeddings), context 1024: ~0.58 GFLOP/token.
    assert transformer_flops_per_token(85_000_000, 12, 768, 1024) == pytest.approx(6 * 85e6 + 12 * 12 * 768 * 1024)
    assert peak_flops(torch.device("cpu"), "bf16") is None


def test_a_finished_run_writes_a_report_and_curves(compose, tmp_path):
    pytest.importorskip("matplotlib")
    train(compose(*QUICK), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "test/accuracy" in report and "samples/s" in report and "checkpoints/best.pt" in report
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_an_lr_sweep_has_one_labelled_curve_per_run(run_cli, tmp_path):
    pytest.importorskip("matplotlib")
    swept = run_cli("train", "-m", "optim.lr=1e-3,3e-3,1e-2", *QUICK)
    assert swept.returncode == 0, swept.output
    sweep = next((tmp_path / "outputs").glob("*/*_train_multirun"))
    plotted = run_cli("plot", str(sweep / "0"), str(sweep / "1"), str(sweep / "2"), "--out", "lr.png")
    assert plotted.returncode == 0, plotted.output
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    from bigmodel_cli.telemetry.plots import plot_runs

    figure = plot_runs([sweep / "0", sweep / "1", sweep / "2"], tmp_path / "again.png")
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert labels == ["optim.lr=0.001", "optim.lr=0.003", "optim.lr=0.01"]
    assert all(len(ax.lines) == 3 for ax in figure.axes)


def test_plot_errors_are_one_line(run_cli, tmp_path):
    result = run_cli("plot", str(tmp_path / "nope"))
    assert result.returncode == 2 and "has no metrics.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
