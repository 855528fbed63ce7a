"""Loggers, throughput figures, plots and reports."""

import csv
import json

import pytest

from bigmodel_cli.commands.train import train


QUICK = ("trainer.max_steps=20", "trainer.log_every=5", "trainer.val_every=10", "trainer.progress=plain")


@pytest.mark.integration
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


@pytest.mark.integration
def test_csv_has_one_row_per_record_and_a_column_per_metric(compose, tmp_path):
    train(compose(*QUICK), tmp_path)  # jsonl, csv and tensorboard are the default loggers
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(jsonl)
    assert {"step", "loss", "lr", "val/loss", "val/accuracy", "test/accuracy"} <= set(rows[0])
    assert [float(r["loss"]) for r in rows if r["loss"]] == [r["loss"] for r in jsonl if "loss" in r]


@pytest.mark.integration
def test_throughput_memory_and_no_mfu_on_cpu(compose, tmp_path):
    train(compose(*QUICK, "model=gpt", "data=text", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                  "trainer.eval_batches=2", "trainer.device=cpu"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    for record in train_records:
        assert record["tokens_per_s"] > 0 and record["step_ms"] > 0 and record["peak_mem_mb"] > 10
        assert 0 <= record["data_wait"] < 1
        assert "mfu" not in record  # CPU: no peak to compare with, so nothing is made up


@pytest.mark.unit
def test_mfu_estimate_and_peak_table():
    import torch

    from bigmodel_cli.telemetry.efficiency import peak_flops, transformer_flops_per_token

    # GPT-2 small, 124M parameters (85M without embeddings), context 1024: ~0.58 GFLOP/token.
    assert transformer_flops_per_token(85_000_000, 12, 768, 1024) == pytest.approx(6 * 85e6 + 12 * 12 * 768 * 1024)
    assert peak_flops(torch.device("cpu"), "bf16") is None


@pytest.mark.integration
def test_a_finished_run_writes_a_report_and_curves(compose, tmp_path):
    pytest.importorskip("matplotlib")
    train(compose(*QUICK), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "test/accuracy" in report and "samples/s" in report and "checkpoints/best.pt" in report
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
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


@pytest.mark.integration
def test_plot_errors_are_one_line(run_cli, tmp_path):
    result = run_cli("plot", str(tmp_path / "nope"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def fake_run(folder, overrides=None, steps=(5, 10, 15, 20), summary=None, config=None):
    """A run dir as `bigmodel train` leaves it: .hydra/overrides.yaml (when `overrides` is a
    list), train and validation records in metrics.jsonl (none when `steps` is empty)."""
    (folder / ".hydra").mkdir(parents=True)
    if overrides is not None:
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides) or "[]\n")
    records = []
    for step in steps:
        records.append({"step": step, "loss": 2.0 / step, "lr": 0.01})
        records.append({"step": step, "val/loss": 1.0 + (step - 10) ** 2 / 100, "val/accuracy": step / 40})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return folder


@pytest.mark.integration
def test_plot_of_a_folder_takes_only_training_runs_and_says_how_many_it_skipped(run_cli, tmp_path):
    pytest.importorskip("matplotlib")
    day = tmp_path / "outputs" / "2025-01-01"
    fake_run(day / "10-00-00_train", ["optim.lr=0.1"])
    for job in range(2):  # a sweep: its jobs are runs, the sweep dir is not one
        fake_run(day / "11-00-00_train_multirun" / str(job), [f"optim.lr={job}"])
    (day / "11-00-00_train_multirun" / "multirun.yaml").write_text("hydra: {}\n")
    failed = day / "12-00-00_train"  # failed before training: a log, its config, a marker
    (failed / ".hydra").mkdir(parents=True)
    for name in ("train.log", "config.yaml", "failed.json"):
        (failed / name).write_text("{}\n")
    evaluated = day / "13-00-00_eval"  # evaluations only: no training record
    (evaluated / ".hydra").mkdir(parents=True)
    (evaluated / "eval.log").write_text("")
    (evaluated / "metrics.jsonl").write_text(json.dumps({"step": 0, "val/loss": 0.5}) + "\n")
    (day / "14-00-00_prepare" / ".hydra").mkdir(parents=True)
    result = run_cli("plot", str(tmp_path / "outputs"), "--out", "all.png")
    assert result.returncode == 0, result.output
    assert "skipped 3 run dirs without training records" in result.stdout
    assert "wrote all.png (3 runs)" in result.stdout
    from bigmodel_cli.commands.plot import expand

    runs, skipped = expand([str(day), str(day / "10-00-00_train")])
    assert skipped == 3 and [p.relative_to(day).as_posix() for p in runs] == [
        "10-00-00_train", "11-00-00_train_multirun/0", "11-00-00_train_multirun/1"]


@pytest.mark.integration
def test_plot_of_a_folder_without_a_training_run_is_a_one_line_error(run_cli, tmp_path):
    (tmp_path / "runs" / "13-00-00_eval" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for folder, skipped in (("runs", "skipped 1 run dir"), ("empty", "")):
        result = run_cli("plot", str(tmp_path / folder))
        assert result.returncode == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "holds no training run" in errors[0] and skipped in errors[0]
        assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_labels_name_the_overrides_that_differ_else_the_run_dirs(tmp_path):
    from bigmodel_cli.telemetry.plots import run_labels

    a = fake_run(tmp_path / "sweep" / "0", ["optim.lr=0.001", "trainer.max_steps=20"])
    b = fake_run(tmp_path / "sweep" / "1", ["optim.lr=0.01", "trainer.max_steps=20"])
    assert run_labels([a, b]) == ["optim.lr=0.001", "optim.lr=0.01"]
    same = fake_run(tmp_path / "other" / "0", ["optim.lr=0.001", "trainer.max_steps=20"])
    assert run_labels([a, same]) == ["sweep/0", "other/0"]  # identical overrides: the dirs
    assert run_labels([a, b, same]) == ["optim.lr=0.001 (sweep/0)", "optim.lr=0.01", "optim.lr=0.001 (other/0)"]
    plain = fake_run(tmp_path / "day" / "10-00-00_train", [])
    unknown = fake_run(tmp_path / "day" / "11-00-00_train")  # no overrides.yaml
    assert run_labels([a, plain, unknown]) == ["optim.lr=0.001 trainer.max_steps=20", "(defaults)",
                                               "day/11-00-00_train"]


@pytest.mark.unit
def test_many_runs_get_distinct_styles_and_a_legend_that_fits(tmp_path):
    pytest.importorskip("matplotlib")
    from bigmodel_cli.telemetry.plots import plot_runs

    runs = [fake_run(tmp_path / "sweep" / str(i), [f"optim.lr={i / 1000}", "seed=1"]) for i in range(27)]
    figure = plot_runs(runs, tmp_path / "many.png")
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [f"optim.lr={i / 1000}" for i in range(27)]
    for ax in figure.axes:
        looks = {(tuple(line.get_color()), line.get_linestyle()) for line in ax.lines}
        assert len(looks) == len(ax.lines) == 27
    figure.canvas.draw()
    box, page = legend.get_window_extent(), figure.bbox
    columns = {round(t.get_window_extent().x0) for t in legend.get_texts()}
    assert len(columns) > 1 and legend.get_texts()[0].get_fontsize() < 8
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0  # inside the figure
    assert all(box.y1 <= ax.get_position().y0 * page.height for ax in figure.axes)  # below the panels


@pytest.mark.unit
def test_curves_mark_the_best_monitored_step(tmp_path):
    pytest.importorskip("matplotlib")
    from bigmodel_cli.telemetry.plots import plot_runs

    def notes(figure):
        return {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes}

    finished = fake_run(tmp_path / "a", [], summary={"monitor": "val/accuracy", "best_step": 15, "best_value": 0.375})
    assert notes(plot_runs([finished], tmp_path / "a.png"))["validation accuracy"] == [
        "best val/accuracy 0.375 @ step 15"]
    # No summary.json (not finished): picked from the records as trainer.monitor_mode says.
    config = "trainer:\n  monitor: val/loss\n  monitor_mode: {}\n"
    lowest = fake_run(tmp_path / "b", [], config=config.format("auto"))
    assert notes(plot_runs([lowest], tmp_path / "b.png"))["validation loss"] == ["best val/loss 1 @ step 10"]
    highest = fake_run(tmp_path / "c", [], config=config.format("max"))
    assert notes(plot_runs([highest], tmp_path / "c.png"))["validation loss"] == ["best val/loss 2 @ step 20"]
    # Several runs: a star per run on the monitored panel, no text.
    figure = plot_runs([lowest, highest], tmp_path / "both.png")
    panel = next(ax for ax in figure.axes if ax.get_title().startswith("validation loss"))
    assert len(panel.collections) == 2 and not panel.texts and "best" in panel.get_title()


@pytest.mark.integration
def test_report_shows_the_device_used_and_the_time_the_console_shows(compose, tmp_path, caplog):
    pytest.importorskip("matplotlib")
    import re

    from bigmodel_cli.telemetry.plots import plot_runs

    with caplog.at_level("INFO", logger="bigmodel"):
        summary = train(compose(*QUICK, "trainer.device=auto"), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert summary["device"] in ("cpu", "cuda:0", "mps") and f"device {summary['device']}," in report
    assert "device auto" not in report
    done = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("done in"))
    assert re.search(r"done in ([0-9.]+)s", done)[1] == re.search(r"\| wall time \| ([0-9.]+) s \|", report)[1]
    texts = [t.get_text() for ax in plot_runs([tmp_path], tmp_path / "again.png").axes for t in ax.texts]
    assert texts == [f"best {summary['monitor']} {summary['best_value']:.4g} @ step {summary['best_step']}"]


@pytest.mark.unit
def test_a_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    import sys

    from bigmodel_cli.errors import UserError
    from bigmodel_cli.telemetry.plots import plot_runs
    from bigmodel_cli.telemetry.report import write_curves

    run = fake_run(tmp_path / "run", [])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(UserError, match="plots need matplotlib: pip install matplotlib"):
        plot_runs([run], tmp_path / "p.png")
    assert write_curves(run) == f"no curves.png: plots need matplotlib: pip install matplotlib, then `bigmodel plot {run}`"
