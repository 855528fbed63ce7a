"""Activation checkpointing of one block: in training, keep only its input and recompute the
rest in the backward pass (engine/parallelize.py and engine/pipeline.py apply it)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recomputing(block: nn.Module, forward: Callable) -> Callable:
    def forward_with_recompute(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return forward_with_recompute
