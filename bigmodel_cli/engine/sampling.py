"""Autoregressive sampling from a language model (logits shaped (B, T, vocab))."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from bigmodel_cli.engine.logits import logits_of


# Below this the distribution is a point mass on the argmax in float32 (and dividing by
# the temperature would overflow to inf and nan): sampling is greedy.
GREEDY_BELOW = 1e-6


class Recompute:
    """The next-token logits (B, vocab) of a sequence, from the model run over its last
    `block_size` tokens (positions 0..T-1) at every step."""

    def __init__(self, model: nn.Module, block_size: int):
        self.model, self.block_size = model, block_size

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(idx[:, -self.block_size:]))[:, -1, :]


class Cached(Recompute):
    """The same logits from a model with a KV cache (`new_kv_cache` and `forward_cached`, as
    bigmodel's GPT has): the prompt fills the cache, then each step feeds only the new token.
    Once the sequence is longer than block_size the window slides and every token's position
    changes, so from then on each step recomputes the window, exactly as Recompute does."""

    def __init__(self, model: nn.Module, block_size: int):
        super().__init__(model, block_size)
        self.cache = None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.block_size:
            return super().__call__(idx)
        if self.cache is None:
            self.cache = self.model.new_kv_cache(idx.shape[0])
        return self.model.forward_cached(idx[:, self.cache.length:], self.cache)[:, -1, :]


def has_kv_cache(model: nn.Module) -> bool:
    return callable(getattr(model, "new_kv_cache", None)) and callable(getattr(model, "forward_cached", None))


def next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int],
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token (B, 1) per row of `logits` (B, vocab)."""
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def sample_tokens(model: nn.Module, context: torch.Tensor, max_new_tokens: int, block_size: int,
                  temperature: float = 1.0, top_k: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, kv_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence in `context` (B, T), one step at a time; the
    model sees at most its last `block_size` tokens. temperature 0 (or below GREEDY_BELOW) is
    greedy. `kv_cache` uses the model's KV cache where it has one (the same tokens, faster)."""
    next_logits = (Cached if kv_cache and has_kv_cache(model) else Recompute)(model, block_size)
    idx = context
    for _ in range(max_new_tokens):
        token = next_token(next_logits(idx), temperature, top_k, generator)
        idx = torch.cat([idx, token], dim=1)
        yield token[:, 0]
