"""explain.json (the numbers), attributions.npz (the maps) and report.md (in words)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from omegaconf import DictConfig

from bigmodel_cli.explain.examples import parse_target
from bigmodel_cli.explain.methods import METHODS
from bigmodel_cli.telemetry import write_json


def arrays(explained) -> Dict[str, np.ndarray]:
    """What attributions.npz holds (plain arrays: np.load reads it without pickle)."""
    out = {"inputs": explained.examples.x.detach().cpu().numpy(),
           "baseline": explained.space.baselines(explained.inputs[:1]).cpu().numpy(),
           "targets": explained.predictions.targets.cpu().numpy(),
           "predicted": explained.predictions.predicted.cpu().numpy()}
    for name, maps in explained.maps.items():
        out[f"{name}_features"] = maps.features
        out[f"{name}_groups"] = maps.groups
    return out


def predictions(explained) -> List[Dict[str, object]]:
    p, labels = explained.predictions, explained.examples.labels
    rows = []
    for i in range(len(p.targets)):
        row = {"predicted": p.predicted[i].item(), "target": int(p.targets[i]),
               "target_text": explained.target_text[i], "target_score": float(p.target_scores[i])}
        if not math.isnan(float(p.confidence[i])):
            row["confidence"] = float(p.confidence[i])
        if labels is not None:
            row["label"] = int(labels[i])
        if explained.tokens is not None:
            row["tokens"] = explained.tokens[i]
        rows.append(row)
    return rows


def summary(explained, cfg: DictConfig, files: List[Path]) -> Dict[str, object]:
    checkpoint = explained.checkpoint
    return {
        "checkpoint": str(checkpoint.path.absolute()), "step": checkpoint.step, "model": explained.model_name,
        "task": explained.spec.task, "input_kind": explained.spec.input_kind, "unit": explained.space.unit,
        "examples": {"source": explained.examples.source, "count": len(explained.examples.x)},
        "target": str(parse_target(cfg.target)), "methods": explained.names,
        "settings": {"n_steps": cfg.n_steps, "n_samples": cfg.n_samples, "seed": cfg.seed},
        "predictions": predictions(explained),
        **explained.trust,
        "files": [f.name for f in files],
    }


def number(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def completeness_lines(found: Optional[Dict]) -> List[str]:
    if not found:
        return ["Not computed: it is a property of integrated gradients; add ig to the methods (methods=[ig,...])."]
    return [f"Integrated gradients' attributions add up to the change of the explained score from the baseline "
            f"to the input within {found['mean_relative_error']:.2%} on average (worst example "
            f"{found['max_relative_error']:.2%}; mean |convergence delta| {found['mean_abs_delta']:.3g}). "
            "Per example: explain.json, completeness."]


def agreement_lines(agreed: Dict[str, Optional[float]]) -> List[str]:
    if not agreed:
        return ["One method only: name several to compare them, e.g. methods=[ig,lime,kernel_shap]."]
    lines = ["| methods | rank correlation |", "|---|---|"]
    lines += [f"| {pair.replace('~', ' vs ')} | {number(value)} |" for pair, value in agreed.items()]
    return lines


def randomisation_lines(found: Optional[Dict]) -> List[str]:
    if not found:
        return ["Skipped (sanity_check=false)."]
    failed = [name for name, m in found["methods"].items() if not m["passed"]]
    if found["passed"]:
        verdict = ("**PASSED**: for every method the maps of the model with re-initialised weights correlate "
                   f"clearly less (by more than {found['margin']}) with the trained model's maps than the methods "
                   "agree with each other: the maps depend on what the model learned.")
    else:
        verdict = (f"**FAILED** for {', '.join(failed)}: the maps of the model with re-initialised weights are "
                   "about as similar to the trained model's maps as the methods are to each other, so those maps "
                   "show the input's structure more than what the model learned; trust them less.")
    lines = [verdict, "", "| method | trained vs randomised | must be below | passed |", "|---|---|---|---|"]
    lines += [f"| {name} | {number(m['correlation'])} | {number(m['bar'])} | {'yes' if m['passed'] else 'no'} |"
              for name, m in found["methods"].items()]
    return lines


def on_input_lines(found: Dict[str, Dict[str, float]], unit: str) -> List[str]:
    lines = [f"Share of the positive attribution on the {unit}s where the input differs from its baseline "
             f"(for images: the drawn strokes), beside their share of all {unit}s:", ""]
    lines += [f"- {METHODS[name].title}: " + ("no positive attribution" if v["positive_share"] is None else
                                              f"{v['positive_share']:.0%}") + f" on {v['feature_share']:.0%} of the {unit}s"
              for name, v in found.items()]
    return lines


def markdown(s: Dict[str, object]) -> str:
    titles = ", ".join(METHODS[n].title for n in s["methods"])
    parts = [
        f"# Why {s['model']} predicted what it did", "",
        f"Checkpoint `{s['checkpoint']}` (step {s['step']}), {s['task']} on {s['input_kind']}; "
        f"{s['examples']['source']} ({s['examples']['count']} examples), target={s['target']}; methods: {titles}.", "",
        "## Completeness", "", *completeness_lines(s.get("completeness")), "",
        "## Agreement between methods", "",
        f"Spearman rank correlation of the attribution magnitudes per {s['unit']} group, mean over the examples.", "",
        *agreement_lines(s["agreement"]), "",
        "## Model randomisation check", "", *randomisation_lines(s.get("randomisation")), "",
        "## Where the attribution lies", "", *on_input_lines(s["on_input"], s["unit"]), "",
        "## Files", "", *[f"- `{name}`" for name in s["files"]], "",
    ]
    return "\n".join(parts)


def write(s: Dict[str, object], run_dir: Path) -> None:
    s["files"] = [*s["files"], "explain.json", "report.md"]
    write_json(run_dir / "explain.json", s)
    (run_dir / "report.md").write_text(markdown(s), encoding="utf-8")
