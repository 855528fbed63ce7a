"""Curves from runs' metrics.jsonl: train/val loss, the validation metric and the learning
rate against step, one line per run. matplotlib (optional: bigmodel[plot]) draws them
off-screen with its Agg backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from bigmodel_cli.errors import UserError

PLOT_INSTALL_HINT = "pip install matplotlib (or bigmodel[plot])"


def read_records(run_dir: Path) -> List[Dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass run dirs written by bigmodel train "
                        "(with the jsonl logger, on by default)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def run_overrides(run_dir: Path) -> List[str]:
    """The command-line overrides a run was started with (Hydra records them)."""
    for source in (run_dir / ".hydra" / "overrides.yaml", run_dir / "summary.json"):
        if source.is_file():
            if source.suffix == ".json":
                return list(json.loads(source.read_text()).get("overrides", []))
            from omegaconf import OmegaConf

            return [str(o) for o in OmegaConf.load(source)]
    return []


def run_labels(run_dirs: Sequence[Path]) -> List[str]:
    """Each run's overrides, less those every run shares (e.g. a sweep's fixed settings)."""
    overrides = [run_overrides(d) for d in run_dirs]
    shared = set.intersection(*(set(o) for o in overrides)) if len(run_dirs) > 1 else set()
    labels = []
    for run_dir, own in zip(run_dirs, overrides):
        distinct = [o for o in own if o not in shared and not o.startswith("hydra.")]
        labels.append(" ".join(distinct) or run_dir.name)
    return labels


def plot_runs(run_dirs: Sequence[Path], out: Path):
    """Write one PNG with every run overlaid; returns the matplotlib figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"plots need matplotlib: {PLOT_INSTALL_HINT}") from None
    runs = [(Path(d), read_records(Path(d))) for d in run_dirs]
    labels = run_labels([d for d, _ in runs])
    metric = next((k for _, records in runs for r in records for k in r
                   if k.startswith("val/") and k != "val/loss"), None)
    panels = [("train loss", "loss"), ("validation loss", "val/loss"),
              (f"validation {metric[4:]}" if metric else "validation metric", metric), ("learning rate", "lr")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (title, key) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        for (_, records), label in zip(runs, labels):
            points = [(r["step"], r[key]) for r in records if key and key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=label, marker="o" if len(points) < 12 else None, markersize=3)
        if key in ("loss", "val/loss") and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, names = axes.flat[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(3, max(1, len(names))), fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig
