"""The logits in whatever a model's forward returns: the one place the engine reads them.

bigmodel's own models return a tensor. Models from elsewhere return a tuple (the logits
first), a dict, or a Hugging Face `ModelOutput` (a dict with attributes, `.logits`). The
engine computes the loss itself from the logits, so a model is never given the targets
and never needs a loss of its own. Reading the logits is attribute and type checks only:
no copy, no host sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class NoLogits(TypeError):
    """A model's forward returned something without a logits tensor in it."""


def logits_of(output: Any) -> torch.Tensor:
    """A tensor as it is; `.logits` or ["logits"] (ModelOutput, dict, named tuple); else the
    first element of a tuple or list, or the first value of a dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits", next(iter(output.values()), None))
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise NoLogits(f"it returns a {type(output).__name__} with no logits tensor in it; return the logits, "
                       "or a tuple or dict whose first element (or 'logits') they are")
    return logits
