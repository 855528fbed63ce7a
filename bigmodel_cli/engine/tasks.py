"""Loss and metrics by task. Metrics accumulate as device tensors (no host sync per batch)."""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F


class Task:
    name = ""
    #: metric name -> True when larger is better
    metrics: Dict[str, bool] = {}

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed statistics of one batch as a 1-D tensor; `finalize` turns totals into metrics."""
        raise NotImplementedError

    def finalize(self, sums: torch.Tensor) -> Dict[str, float]:
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    metrics = {"loss": False, "accuracy": True}

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target)

    def batch_sums(self, output, target):
        loss_sum = F.cross_entropy(output.float(), target, reduction="sum")
        correct = (output.argmax(-1) == target).sum()
        count = torch.full_like(loss_sum, target.shape[0])  # a fill, not a host-to-device copy
        return torch.stack([loss_sum, correct.to(loss_sum.dtype), count])

    def finalize(self, sums):
        loss_sum, correct, count = sums.tolist()
        return {"loss": loss_sum / count, "accuracy": correct / count}


class Regression(Task):
    name = "regression"
    metrics = {"loss": False, "mae": False}

    def loss(self, output, target):
        return F.mse_loss(output.float(), target)

    def batch_sums(self, output, target):
        err = output.float() - target
        sq = err.pow(2).sum()
        return torch.stack([sq, err.abs().sum(), torch.full_like(sq, err.numel())])

    def finalize(self, sums):
        sq, ab, count = sums.tolist()
        return {"loss": sq / count, "mae": ab / count}


class LanguageModeling(Task):
    """Next-token cross-entropy in nats per token; perplexity = exp(loss)."""

    name = "language_modeling"
    metrics = {"loss": False, "perplexity": False}

    def loss(self, output, target):
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten())

    def batch_sums(self, output, target):
        loss_sum = F.cross_entropy(output.float().flatten(0, 1), target.flatten(), reduction="sum")
        return torch.stack([loss_sum, torch.full_like(loss_sum, target.numel())])

    def finalize(self, sums):
        loss_sum, count = sums.tolist()
        loss = loss_sum / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


TASKS = {t.name: t for t in (Classification, Regression, LanguageModeling)}


def task_for(name: str) -> Task:
    return TASKS[name]()
