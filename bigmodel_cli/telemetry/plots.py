"""Curves from runs' metrics.jsonl (or metrics.csv): train/val loss, the validation metric
and the learning rate against step, one line per run, each run's best monitored value
marked. matplotlib draws them off-screen with its Agg backend."""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bigmodel_cli.errors import UserError
from bigmodel_cli.telemetry.run_files import count, monitor_setting, number, read_json, read_records, run_overrides

PLOT_INSTALL_HINT = "pip install matplotlib"
#: With a 10-colour palette these tell 40 runs apart before a colour and style pair repeats.
LINE_STYLES = ("-", "--", ":", "-.")
#: Up to this many runs each run's best point gets a star; beyond, the stars hide the curves.
MAX_BEST_MARKS = 12
#: Where the best-step note may go (axes fraction, alignment), in order of preference.
NOTE_CORNERS = ((0.97, 0.94, "right", "top"), (0.97, 0.06, "right", "bottom"),
                (0.03, 0.94, "left", "top"), (0.03, 0.06, "left", "bottom"))


@dataclass
class Curves:
    """One run as plotted."""

    run_dir: Path
    records: List[Dict[str, Any]]
    label: str = ""
    style: Dict[str, Any] = field(default_factory=dict)
    best: Optional[Tuple[str, int, float]] = None  # the monitored metric, its best step and value


def run_labels(run_dirs: Sequence[Path]) -> List[str]:
    """What tells the runs apart: each run's overrides less those every run shares (e.g. a
    sweep's fixed settings); else its dir relative to the runs' common parent, never a bare
    time stamp where overrides differ."""
    overrides = [run_overrides(Path(d)) for d in run_dirs]
    known = [set(o) for o in overrides if o is not None]
    shared = set.intersection(*known) if len(run_dirs) > 1 and known else set()
    names = relative_names(run_dirs)
    labels = [" ".join(o for o in own if o not in shared and not o.startswith("hydra."))
              if own is not None else "" for own in overrides]
    if not any(labels):  # same overrides everywhere: only the dirs differ
        return names
    labels = [label or (name if own is None else "(defaults)")
              for label, own, name in zip(labels, overrides, names)]
    # Runs started the same way (a repeated command) are told apart by their dirs.
    return [f"{label} ({name})" if labels.count(label) > 1 else label for label, name in zip(labels, names)]


def relative_names(run_dirs: Sequence[Path]) -> List[str]:
    """Each dir relative to the runs' common parent (sweepA/0, sweepB/0), or its name alone."""
    paths = [Path(d).resolve() for d in run_dirs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    return [str(p.relative_to(common)) if p != common else p.name for p in paths]


def run_styles(count: int) -> List[Dict[str, Any]]:
    """A colour and line style per run, no pair repeated: tab10's colours solid, then dashed,
    dotted and dash-dotted; beyond 40 runs a continuous colormap sampled once per run."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    if count > len(palette) * len(LINE_STYLES):
        sample = colormaps["turbo"]
        return [{"color": sample(i / (count - 1)), "linestyle": LINE_STYLES[i % len(LINE_STYLES)]}
                for i in range(count)]
    return [{"color": palette[i % len(palette)], "linestyle": LINE_STYLES[i // len(palette)]} for i in range(count)]


def best_point(run_dir: Path, records: List[Dict]) -> Optional[Tuple[str, int, float]]:
    """The run's best monitored validation value as (metric, step, value): summary.json's
    (the trainer's own), else picked from the records as the trainer picks it (the first
    strictly better value, NaN skipped) for config.yaml's trainer.monitor and monitor_mode."""
    saved = read_json(run_dir / "summary.json") or {}  # damaged: picked from the records instead
    step, value = count(saved.get("best_step")), number(saved.get("best_value"))
    if step is not None and value is not None and isinstance(saved.get("monitor"), str):
        return saved["monitor"], step, value
    metric, maximize = monitor_setting(run_dir)
    best: Optional[Tuple[int, float]] = None
    for record in records:
        value = record.get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            continue
        if best is None or (value > best[1] if maximize else value < best[1]):
            best = (int(record["step"]), float(value))
    return (metric, *best) if best else None


def load_pyplot():
    """pyplot on the off-screen Agg backend, or a one-line UserError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"plots need matplotlib: {PLOT_INSTALL_HINT}") from None
    return plt


def legend_layout(labels: Sequence[str], width_in: float) -> Tuple[List[str], int, float, int]:
    """Labels wrapped to the figure's width, columns, font size and text lines for a legend
    below the panels: smaller type for many runs, as many columns as the longest line lets
    fit across the figure. Wrapped, a label is never cut off at the figure's edge."""
    fontsize = 8.0 if len(labels) <= 10 else 7.0 if len(labels) <= 30 else 6.0
    chars_across = int(width_in * 72 / (fontsize * 0.6))  # a character is about 0.6 em wide
    wrapped = [textwrap.fill(label, max(20, chars_across - 6), break_on_hyphens=False) or label for label in labels]
    longest = max(len(line) for label in wrapped for line in label.splitlines() or [""])
    ncol = max(1, min(len(labels), chars_across // (longest + 6)))
    rows = [wrapped[i:i + ncol] for i in range(0, len(wrapped), ncol)]
    lines = sum(max(label.count("\n") + 1 for label in row) for row in rows)
    return wrapped, ncol, fontsize, lines


def panels(runs: Sequence[Curves]) -> List[Tuple[str, Optional[str]]]:
    """(title, record key) of the four panels; the metric panel shows the monitored metric."""
    monitored = [r.best[0] for r in runs if r.best and r.best[0] != "val/loss"]
    metric = monitored[0] if monitored else next(
        (k for r in runs for record in r.records for k in record if k.startswith("val/") and k != "val/loss"), None)
    return [("train loss", "loss"), ("validation loss", "val/loss"),
            (f"validation {metric[4:]}" if metric else "validation metric", metric), ("learning rate", "lr")]


def draw_panel(ax, title: str, key: Optional[str], runs: Sequence[Curves]) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    for run in runs:
        points = [(r["step"], r[key]) for r in run.records if key and key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=run.label, marker="o" if len(points) < 12 else None, markersize=3,
                    **run.style)
    if key in ("loss", "val/loss") and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")
        # Plain numbers (4.2, not 4.2x10^0): easier to read, and no mathtext to lay out.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    mark_best(ax, key, runs)
    ax.grid(alpha=0.3)


def mark_best(ax, key: Optional[str], runs: Sequence[Curves]) -> None:
    """A star on each run's best monitored value; one run also gets 'best <metric> <value> @
    step N' in the corner its curve leaves free, with an arrow to the star."""
    marked = [r for r in runs if key and r.best and r.best[0] == key]
    if not marked or len(runs) > MAX_BEST_MARKS:
        return
    for run in marked:
        ax.scatter([run.best[1]], [run.best[2]], marker="*", s=120, color=run.style.get("color"),
                   edgecolors="black", linewidths=0.6, zorder=3)
    if len(runs) > 1:
        ax.set_title(f"{ax.get_title()} (\u2605 best of each run)")
        return
    metric, step, value = marked[0].best
    x, y, ha, va = free_corner(ax)
    ax.annotate(f"best {metric} {value:.4g} @ step {step}", xy=(step, value), xytext=(x, y),
                textcoords="axes fraction", ha=ha, va=va, fontsize=8,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
                arrowprops={"arrowstyle": "->", "color": "0.3"})


def free_corner(ax) -> Tuple[float, float, str, str]:
    """Where a note hides the least of the curves: the corner whose note-sized box (40% of
    the axes wide, 15% high) the lines cross least, sampled evenly along each line."""
    import numpy as np

    to_axes = ax.transData + ax.transAxes.inverted()  # log scales included
    points = []
    for line in ax.lines:
        xy = to_axes.transform(line.get_xydata())
        at = np.linspace(0, len(xy) - 1, max(400, len(xy)))
        points.append(np.column_stack([np.interp(at, np.arange(len(xy)), xy[:, i]) for i in (0, 1)]))
    if not points:  # nothing drawn (a run resumed at its last step): any corner is free
        return NOTE_CORNERS[0]
    xy = np.concatenate(points)

    def crossings(corner) -> int:
        x, y, ha, va = corner
        left, bottom = (x - 0.4 if ha == "right" else x), (y - 0.15 if va == "top" else y)
        inside = (xy[:, 0] >= left) & (xy[:, 0] <= left + 0.4) & (xy[:, 1] >= bottom) & (xy[:, 1] <= bottom + 0.15)
        return int(inside.sum())

    return min(NOTE_CORNERS, key=crossings)


def plot_runs(run_dirs: Sequence[Path], out: Path):
    """Write one PNG with every run overlaid; returns the matplotlib figure."""
    plt = load_pyplot()
    from matplotlib.lines import Line2D

    runs = [Curves(Path(d), read_records(Path(d))) for d in run_dirs]
    for run, label, style in zip(runs, run_labels([r.run_dir for r in runs]), run_styles(len(runs))):
        run.label, run.style, run.best = label, style, best_point(run.run_dir, run.records)
    width, panels_height = 11.0, 7.5
    labels, ncol, fontsize, lines = legend_layout([r.label for r in runs], width)
    legend_height = lines * fontsize / 72 * 1.6 + 0.25  # inches, with the legend's own padding
    height = panels_height + legend_height
    fig, axes = plt.subplots(2, 2, figsize=(width, height))
    # Fixed margins, not a layout engine: matplotlib's constrained layout measures every tick
    # label with an extra pass over the figure, half of every run's plotting time. The panels'
    # labels are short numbers, so these margins hold them; the legend has its own band below.
    fig.subplots_adjust(left=0.07, right=0.985, top=1 - 0.35 / height, bottom=(legend_height + 0.5) / height,
                        wspace=0.18, hspace=0.32 * panels_height / height)
    for ax, (title, key) in zip(axes.flat, panels(runs)):
        draw_panel(ax, title, key, runs)
    handles = [Line2D([], [], **r.style) for r in runs]  # every run, even one with no train records
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.05 / height), ncol=ncol,
               fontsize=fontsize)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)  # no bbox_inches="tight": it would draw the figure twice
    plt.close(fig)
    return fig
