"""lr_find.png: the range test's loss against lr (log axis), smoothed over raw, with the
suggested lr and the lowest point marked. Drawn off-screen (Agg), as plots.py does."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from bigmodel_cli.engine.lr_range import Suggestion, as_override
from bigmodel_cli.telemetry.plots import load_pyplot


def plot_lr_find(lrs: Sequence[float], smoothed: Sequence[float], losses: Sequence[float],
                 found: Optional[Suggestion], out: Path) -> None:
    plt = load_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    try:
        ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss per step")
        ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title("LR range test")
        ax.grid(True, alpha=0.3)
        if smoothed:
            # The first points set the scale: the divergence at the end would squash the curve.
            top = max(smoothed[0], min(smoothed) * 1.5)
            ax.set_ylim(min(min(smoothed), min(losses)) * 0.95, top * 1.15)
        if found is not None:
            ax.axvline(found.min_loss_lr, color="0.5", linestyle=":", label=f"lowest smoothed loss, lr {found.min_loss_lr:.2g}")
            ax.scatter([found.lr], [smoothed[found.index]], marker="o", s=80, color="tab:red", zorder=3,
                       label=f"suggested: {as_override(found.lr)}")
        ax.legend(loc="lower left")
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
