"""Autoregressive sampling from a language model (logits shaped (B, T, vocab))."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from bigmodel_cli.engine.outputs import logits_of


# Below this the distribution is a point mass on the argmax in float32 (and dividing by
# the temperature would overflow to inf and nan): sampling is greedy.
GREEDY_BELOW = 1e-6


@torch.no_grad()
def sample_tokens(model: nn.Module, context: torch.Tensor, max_new_tokens: int, block_size: int,
                  temperature: float = 1.0, top_k: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence in `context` (B, T), one step at a time; the
    model sees at most its last `block_size` tokens. temperature 0 (or below GREEDY_BELOW) is greedy."""
    idx = context
    for _ in range(max_new_tokens):
        logits = logits_of(model(idx[:, -block_size:]))[:, -1, :].float()
        if temperature < GREEDY_BELOW:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, token], dim=1)
        yield token[:, 0]
