"""sweep.png: the monitored metric against each swept numeric setting (one panel each,
best marked, jobs without a result as crosses along the top), and the training loss of
the best jobs overlaid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bigmodel_cli.run_outcome import JobResult

#: settings drawn on a log axis whatever their range
LOG_KEYS = ("lr", "weight_decay", "min_lr", "eps")
#: how many panels of settings at most, and how many of the best jobs' curves
MAX_SETTING_PANELS = 4
TOP_CURVES = 5


def numeric_values(jobs: Sequence[JobResult], key: str) -> Optional[List[Optional[float]]]:
    """Each job's value of `key` as a number (None where a job does not set it), or None
    when any value is not a number (a choice such as model=cnn)."""
    values: List[Optional[float]] = []
    for job in jobs:
        raw = job.override_items().get(key)
        try:
            values.append(None if raw is None else float(raw))
        except ValueError:
            return None
    return values if any(v is not None and math.isfinite(v) for v in values) else None


def log_axis(key: str, values: Sequence[Optional[float]]) -> bool:
    positive = [v for v in values if v is not None and v > 0]
    if len(positive) < len([v for v in values if v is not None]) or not positive:
        return False
    return key.rsplit(".", 1)[-1] in LOG_KEYS or max(positive) / min(positive) >= 100


def draw_setting(ax, key: str, values: Sequence[Optional[float]], jobs: Sequence[JobResult]) -> None:
    """The metric of each job at its value of `key`; the best job starred."""
    monitor = next((j.monitor for j in jobs if j.monitor), "metric")
    scored = [(v, j.best) for v, j in zip(values, jobs) if v is not None and j.scored]
    lost = [v for v, j in zip(values, jobs) if v is not None and not j.scored]
    if scored:
        ax.plot(*zip(*sorted(scored)), "o-", color="tab:blue", label="jobs")
        best = next(((v, j.best) for v, j in zip(values, jobs) if j.scored and v is not None), None)
        if best is not None:  # jobs are ranked best first
            ax.plot(*best, marker="*", markersize=16, color="gold", markeredgecolor="black",
                    linestyle="none", label=f"best: {key}={best[0]:g}")
    if lost:
        ax.plot(lost, [0.97] * len(lost), "x", color="tab:red", markersize=10, clip_on=False,
                transform=ax.get_xaxis_transform(), linestyle="none", label="diverged / failed")
    if log_axis(key, values):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"best {monitor}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def draw_top_curves(ax, jobs: Sequence[JobResult], labels: Dict[str, str]) -> None:
    from bigmodel_cli.telemetry.plots import run_styles
    from bigmodel_cli.telemetry.run_files import metrics_file, read_records

    top = [j for j in jobs if j.scored and metrics_file(Path(j.run_dir)) is not None][:TOP_CURVES]
    for job, style in zip(top, run_styles(len(top))):
        points = [(r["step"], r["loss"]) for r in read_records(Path(job.run_dir))
                  if "loss" in r and math.isfinite(r["loss"])]
        if points:
            ax.plot(*zip(*points), label=labels[job.run_dir], **style)
    ax.set_title(f"training loss, best {len(top)} job(s)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if top:
        ax.legend(fontsize="small")


def plot_sweep(out: Path, jobs: Sequence[JobResult], keys: Sequence[str]) -> None:
    from bigmodel_cli.telemetry.plots import load_pyplot

    plt = load_pyplot()
    settings = [(k, v) for k in keys if (v := numeric_values(jobs, k)) is not None][:MAX_SETTING_PANELS]
    panels = len(settings) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for ax, (key, values) in zip(axes[0], settings):
        draw_setting(ax, key, values, jobs)
    draw_top_curves(axes[0][-1], jobs, {j.run_dir: j.label(keys) for j in jobs})
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
