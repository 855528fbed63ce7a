"""How far to trust the maps: completeness, model randomisation, agreement.

- Completeness (integrated gradients): its attributions should add up to the change of
  the explained score from the baseline to the input; Captum's convergence delta is the
  difference, reported per example and relative to that change.
- Model randomisation (Adebayo et al., 2018, "Sanity checks for saliency maps"): the
  same maps for the model with every weight re-initialised. A map that explains the
  model must change when the model does: the rank correlation of the trained and the
  randomised maps should be clearly lower than the methods' agreement with each other.
- Agreement: the rank correlation of the maps of each pair of methods.

Maps are compared on the feature groups every method shares (image patches, steps,
tokens), by the ranks of their magnitudes (Spearman, as Adebayo et al. do: signed and
unsigned methods alike), over the groups where the input differs from its baseline
(elsewhere integrated gradients and occlusion are zero by construction, whatever the
model). The correlations are averaged over the examples.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

#: how much lower than the methods' agreement a randomised model's correlation must be
CLEAR_MARGIN = 0.2
#: with a single method there is no agreement to compare with: a fixed bar instead
SINGLE_METHOD_BAR = 0.5


def rank_correlations(a: np.ndarray, b: np.ndarray, compared: np.ndarray) -> List[float]:
    """Per row, Spearman's rank correlation of |a| and |b| over the `compared` columns: nan
    where a row has fewer than 3 of them or both maps are flat there; 0 where one map is
    flat (LIME's lasso may zero every group): a flat map shares no ranking with any other."""
    from scipy.stats import spearmanr

    out = []
    for row_a, row_b, keep in zip(np.abs(a), np.abs(b), compared):
        if keep.sum() < 3:
            out.append(float("nan"))
            continue
        flat_a, flat_b = np.ptp(row_a[keep]) == 0, np.ptp(row_b[keep]) == 0
        if flat_a and flat_b:
            out.append(float("nan"))
        elif flat_a or flat_b:
            out.append(0.0)
        else:
            out.append(float(spearmanr(row_a[keep], row_b[keep]).statistic))
    return out


def mean(values: List[float]) -> Optional[float]:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def agreement(groups: Dict[str, np.ndarray], compared: np.ndarray) -> Dict[str, Optional[float]]:
    """'ig~lime' -> mean rank correlation of the two methods' maps, for each pair."""
    return {f"{a}~{b}": mean(rank_correlations(groups[a], groups[b], compared))
            for a, b in itertools.combinations(groups, 2)}


def randomisation(trained: Dict[str, np.ndarray], randomised: Dict[str, np.ndarray],
                  compared: np.ndarray) -> Dict[str, Optional[float]]:
    """method -> mean rank correlation of its trained and randomised-model maps."""
    return {name: mean(rank_correlations(trained[name], randomised[name], compared)) for name in trained}


def randomisation_verdict(randomised: Dict[str, Optional[float]], agreed: Dict[str, Optional[float]]) -> Dict:
    """Per method, whether its randomised-model correlation is clearly below its mean
    agreement with the other methods (by CLEAR_MARGIN; with one method, below a fixed
    bar); passed when every method's is."""
    per_method = {}
    for name, value in randomised.items():
        theirs = [v for pair, v in agreed.items() if name in pair.split("~") and v is not None]
        bar = float(np.mean(theirs)) - CLEAR_MARGIN if theirs else SINGLE_METHOD_BAR
        per_method[name] = {"correlation": value, "bar": bar, "passed": value is not None and value < bar}
    return {"passed": bool(per_method) and all(m["passed"] for m in per_method.values()),
            "margin": CLEAR_MARGIN, "methods": per_method}


def positive_share(features: np.ndarray, changed: np.ndarray) -> Dict[str, Optional[float]]:
    """The share of positive attribution on the features where the input differs from its
    baseline (a digit's strokes), beside those features' share of all features."""
    positive = np.clip(features, 0, None)
    total = float(positive.sum())
    return {"positive_share": float((positive * changed).sum()) / total if total else None,
            "feature_share": float(changed.mean())}


def completeness(delta: torch.Tensor, score_gap: torch.Tensor) -> Dict[str, object]:
    """IG's convergence deltas, absolute and relative to |score(input) - score(baseline)|."""
    relative = delta.abs() / score_gap.abs().clamp_min(1e-6)
    return {"delta": delta.cpu().tolist(), "relative_error": relative.cpu().tolist(),
            "mean_abs_delta": float(delta.abs().mean()), "mean_relative_error": float(relative.mean()),
            "max_relative_error": float(relative.max())}


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """The model with every weight re-initialised (seeded): each module's reset_parameters,
    and N(0, 0.02) for matrices no module resets (a transformer's [CLS] token, say)."""
    clone = copy.deepcopy(model)
    torch.manual_seed(seed)
    reset = set()
    with torch.no_grad():
        for module in clone.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                reset.update(id(p) for p in module.parameters(recurse=False))
        for param in clone.parameters():
            if id(param) not in reset and param.dim() >= 2:
                param.normal_(0.0, 0.02)
    return clone.eval()
