"""The maps as PNGs, drawn off-screen (matplotlib's Agg backend, as for the training curves).

Red is attribution for the explained output, blue against it; each panel is scaled to
its own largest magnitude, so the colours compare features within one example.
- images: `<method>_grid.png`, each example with its map overlaid, predicted and true
  label and confidence; `<method>_class_means.png`, the mean map per explained class.
- sequences: `<method>_steps.png`, each series with its per-step attributions.
- tokens: `<method>_tokens.png`, each example's tokens coloured by attribution.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import numpy as np

from bigmodel_cli.telemetry.plots import load_pyplot

CMAP = "bwr"
#: examples drawn in one picture (all of them are in explain.json and attributions.npz)
MAX_PANELS = 16
#: token rows drawn in a tokens picture
MAX_TOKEN_ROWS = 8


def draw(explained, run_dir: Path) -> List[Path]:
    kind = explained.spec.input_kind
    files: List[Path] = []
    for name in explained.names:
        if kind == "image":
            files.append(image_grid(explained, name, run_dir / f"{name}_grid.png"))
            files.append(class_means(explained, name, run_dir / f"{name}_class_means.png"))
        elif kind == "tokens":
            files.append(token_rows(explained, name, run_dir / f"{name}_tokens.png"))
        else:
            files.append(step_plots(explained, name, run_dir / f"{name}_steps.png"))
    return files


def symmetric(values: np.ndarray) -> float:
    return float(np.abs(values).max()) or 1.0


def label_of(explained, i: int) -> str:
    p = explained.predictions
    if explained.spec.task == "regression":
        return f"predicted {float(p.predicted[i]):.3g}"
    text = f"pred {int(p.predicted[i])} ({float(p.confidence[i]):.0%})"
    labels = explained.examples.labels
    return text if labels is None else f"{text}\ntrue {int(labels[i])}"


def picture_of(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> what imshow draws: one channel in grey (drawn dark on light: gray_r), RGB
    scaled to [0, 1]."""
    if image.shape[0] == 1:
        return image[0]
    rgb = np.moveaxis(image[:3], 0, -1)
    return (rgb - rgb.min()) / (np.ptp(rgb) or 1.0)


def grid_shape(count: int):
    cols = min(count, 4 if count <= 16 else 8)
    return math.ceil(count / cols), cols


def overlay(plt, values: np.ndarray) -> np.ndarray:
    """An RGBA heat map that is transparent where the attribution is near 0, so the input
    shows through, and opaque red or blue where it is large."""
    limit = symmetric(values)
    rgba = plt.get_cmap(CMAP)((values / limit + 1) / 2)
    rgba[..., 3] = 0.9 * np.abs(values) / limit
    return rgba


def image_grid(explained, name: str, out: Path) -> Path:
    plt = load_pyplot()
    images = explained.examples.x.detach().cpu().float().numpy()[:MAX_PANELS]
    h, w = images.shape[2:]
    maps = explained.maps[name].features[:MAX_PANELS].reshape(-1, h, w)
    rows, cols = grid_shape(len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        picture = picture_of(images[i])
        # Strokes in mid grey at most, so that red and blue on them stay red and blue.
        ax.imshow(picture, cmap="gray_r", vmin=picture.min(), vmax=picture.max() + np.ptp(picture),
                  interpolation="nearest")
        ax.imshow(overlay(plt, maps[i]), interpolation="nearest")
        ax.set_title(label_of(explained, i), fontsize=8)
    fig.suptitle(f"{title(explained, name)}: red for the explained class, blue against", fontsize=10)
    return save(fig, out)


def class_means(explained, name: str, out: Path) -> Path:
    plt = load_pyplot()
    h, w = explained.examples.x.shape[2:]
    maps = explained.maps[name].features.reshape(-1, h, w)
    targets = explained.predictions.targets.cpu().numpy()
    classes = sorted(set(targets.tolist()))
    rows, cols = math.ceil(len(classes) / 5), min(len(classes), 5)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, cls in zip(axes.flat, classes):
        mean = maps[targets == cls].mean(0)
        limit = symmetric(mean)
        ax.imshow(mean, cmap=CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"class {cls} ({int((targets == cls).sum())})", fontsize=8)
    fig.suptitle(f"{title(explained, name)}: mean map per explained class", fontsize=10)
    return save(fig, out)


def step_plots(explained, name: str, out: Path) -> Path:
    """Each series (its first channel) with its per-step attributions as bars below it."""
    plt = load_pyplot()
    series = explained.examples.x.detach().cpu().float().numpy()[:MAX_PANELS]
    series = series.reshape(len(series), series.shape[1], -1)[..., 0]
    maps = explained.maps[name].features[:MAX_PANELS]
    rows, cols = grid_shape(len(series))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    steps = np.arange(series.shape[1])
    for i, ax in enumerate(axes.flat):
        if i >= len(series):
            ax.axis("off")
            continue
        limit = symmetric(maps[i])
        colours = plt.get_cmap(CMAP)((maps[i] / limit + 1) / 2)
        ax.bar(steps, maps[i] / limit * np.ptp(series[i]) / 2, bottom=series[i].min() - np.ptp(series[i]) * 0.6,
               color=colours, width=0.9)
        ax.plot(steps, series[i], color="black", linewidth=1)
        ax.set_title(label_of(explained, i), fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title(explained, name)}: the input (line) and each step's attribution (bars)", fontsize=10)
    return save(fig, out)


def token_rows(explained, name: str, out: Path) -> Path:
    """Each example's tokens in a row, on a background coloured by their attribution."""
    plt = load_pyplot()
    tokens = explained.tokens[:MAX_TOKEN_ROWS]
    maps = explained.maps[name].features[:MAX_TOKEN_ROWS]
    width = max(len(row) for row in tokens)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * width), 0.55 * len(tokens) + 0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(len(tokens), -0.6)
    ax.axis("off")
    cmap = plt.get_cmap(CMAP)
    for r, (row, values) in enumerate(zip(tokens, maps)):
        limit = symmetric(values)
        for c, (token, value) in enumerate(zip(row, values)):
            ax.add_patch(plt.Rectangle((c, r), 0.95, 0.8, color=cmap((value / limit + 1) / 2)))
            ax.text(c + 0.47, r + 0.4, visible(token), ha="center", va="center", fontsize=7, family="monospace")
        ax.text(width, r + 0.4, "  -> " + visible(repr(explained.target_text[r])), va="center", fontsize=7,
                family="monospace")
    ax.set_title(f"{title(explained, name)}: each token's part in the next-token prediction", fontsize=10)
    return save(fig, out)


def visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$") or "''"


def title(explained, name: str) -> str:
    from bigmodel_cli.explain.methods import METHODS

    return f"{METHODS[name].title} ({explained.model_name})"


def save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
