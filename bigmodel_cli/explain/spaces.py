"""What the attribution methods perturb and differentiate, for each kind of data.

A `Space` turns a batch of a data set's inputs into the tensor that is attributed, with
the model's score for each output as a function of it, a baseline (the input with
nothing in it), feature groups (what LIME and kernel SHAP switch on and off, and what
occlusion covers) and a reference distribution (gradient SHAP's background):

- images: pixels; the baseline is the blank image (each channel's lowest value in the
  training sample); groups are square patches, about eight to a side.
- sequences: time steps (all of a step's channels together); the baseline is the
  training sample's mean, a flat line.
- vectors: each feature; the baseline is the training sample's mean.
- tokens: token ids cannot be differentiated, so the methods attribute to the output of
  the model's token embedding (replaced through a forward hook); the baseline is the
  zero vector. A token model with no embedding module is explained by perturbation
  only: its ids are swapped for id 0.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine.logits import logits_of

#: patches per image side for LIME, kernel SHAP and occlusion (8x8 digits: 2x2 patches)
PATCHES_PER_SIDE = 8


def output_scores(output, task: str) -> torch.Tensor:
    """The (batch, outputs) scores explained: class logits, regression outputs, or the
    next-token logits after the last position of a language model's input."""
    logits = logits_of(output)
    if task == "language_modeling":
        logits = logits[:, -1]
    return logits.float() if logits.dim() > 1 else logits.float()[:, None]


class Space:
    """Pixels, steps or features of a dense input: the input is attributed as it is."""

    unit = "feature"
    differentiable = True

    def __init__(self, model: nn.Module, spec: DataSpec, background_x: torch.Tensor):
        self.model, self.task = model, spec.task
        self.background_x = background_x
        self.baseline = background_x.float().mean(0, keepdim=True)

    def inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        """What is attributed for raw inputs `x`, and the extra forward arguments."""
        return x.float(), ()

    def forward(self, inputs: torch.Tensor, *extra) -> torch.Tensor:
        return output_scores(self.model(inputs), self.task)

    def baselines(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.baseline.expand_as(inputs).contiguous()

    def background(self, inputs: torch.Tensor) -> torch.Tensor:
        """Gradient SHAP's reference inputs: a sample of the training split."""
        return self.inputs(self.background_x)[0]

    def feature_ids(self, inputs: torch.Tensor) -> torch.Tensor:
        """(1, *input shape) long: the feature (pixel, step, token) each input value is part of."""
        shape = inputs.shape[1:]
        return torch.arange(math.prod(shape), device=inputs.device).reshape(1, *shape)

    def group_ids(self, inputs: torch.Tensor) -> torch.Tensor:
        """(1, *input shape) long: the group each input value is switched on and off with."""
        return self.feature_ids(inputs)

    def occlusion_window(self, inputs: torch.Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(sliding window shape, strides) for occlusion: one feature at a time."""
        ones = tuple(1 for _ in inputs.shape[1:])
        return ones, ones

    def features(self, attributions: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, features): attributions summed over each feature's values."""
        return summed_by(attributions, self.feature_ids(inputs))

    def groups(self, attributions: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, groups): attributions summed over each group, the level every method shares."""
        return summed_by(attributions, self.group_ids(inputs))


def summed_by(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values (B, *shape) summed per id of ids (1, *shape), as (B, number of ids)."""
    flat_ids = ids.reshape(-1)
    out = values.new_zeros(values.shape[0], int(flat_ids.max()) + 1)
    return out.index_add_(1, flat_ids, values.reshape(values.shape[0], -1).to(out.dtype))


class ImageSpace(Space):
    unit = "pixel"

    def __init__(self, model, spec, background_x):
        super().__init__(model, spec, background_x)
        # The blank image: each channel at its lowest value (black, or the digits' paper).
        self.baseline = background_x.float().amin(dim=(0, 2, 3), keepdim=True)
        self.patch = max(2, math.ceil(min(spec.input_shape[1:]) / PATCHES_PER_SIDE))

    def feature_ids(self, inputs):
        _, h, w = inputs.shape[1:]
        pixels = torch.arange(h * w, device=inputs.device).reshape(1, 1, h, w)
        return pixels.expand(1, inputs.shape[1], h, w)  # a pixel's channels are one feature

    def group_ids(self, inputs):
        _, h, w = inputs.shape[1:]
        rows = torch.arange(h, device=inputs.device) // self.patch
        cols = torch.arange(w, device=inputs.device) // self.patch
        patches = rows[:, None] * math.ceil(w / self.patch) + cols[None, :]
        return patches.reshape(1, 1, h, w).expand(1, inputs.shape[1], h, w)

    def occlusion_window(self, inputs):
        c, p = inputs.shape[1], self.patch
        return (c, p, p), (c, max(1, p // 2), max(1, p // 2))


class SequenceSpace(Space):
    unit = "time step"

    def feature_ids(self, inputs):
        t, f = inputs.shape[1:]
        return torch.arange(t, device=inputs.device).reshape(1, t, 1).expand(1, t, f)

    def occlusion_window(self, inputs):
        f = inputs.shape[2]
        return (1, f), (1, f)


class TokenSpace(SequenceSpace):
    """Token ids, attributed through the output of the model's token embedding (one feature
    per position, its whole embedding vector, as a sequence's time step)."""

    unit = "token"

    def __init__(self, model, spec, background_x, embedding: nn.Module):
        self.model, self.task, self.embedding = model, spec.task, embedding
        self.background_x = background_x

    def inputs(self, x):
        with torch.no_grad():
            return self.embedding(x).float(), (x,)

    def forward(self, embedded, ids=None):
        # The ids go through the model as they are (a classifier finds its padding in them);
        # the hook swaps what the embedding makes of them for the (perturbed) vectors given.
        ids = ids.repeat(embedded.shape[0] // ids.shape[0], 1)
        handle = self.embedding.register_forward_hook(lambda module, args, out: embedded.to(out.dtype))
        try:
            return output_scores(self.model(ids), self.task)
        finally:
            handle.remove()

    def baselines(self, inputs):
        return torch.zeros_like(inputs)

    def background(self, inputs):
        return self.inputs(self.background_x[:, -inputs.shape[1]:])[0]


class TokenIdSpace(Space):
    """Token ids of a model with no embedding module: perturbation only, ids swapped for 0."""

    unit = "token"
    differentiable = False

    def __init__(self, model, spec, background_x):
        self.model, self.task, self.background_x = model, spec.task, background_x

    def inputs(self, x):
        return x.float(), ()  # the perturbation methods mix ids with the baseline id 0 whole

    def forward(self, ids, *extra):
        return output_scores(self.model(ids.round().long()), self.task)

    def baselines(self, inputs):
        return torch.zeros_like(inputs)


def token_embedding(model: nn.Module, vocab_size: Optional[int]) -> Optional[nn.Module]:
    """The module that turns token ids into vectors: transformers' input embeddings, else the
    first nn.Embedding with a row per token of the vocabulary."""
    getter: Optional[Callable] = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        found = getter()
        if isinstance(found, nn.Module):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size),
                None)


def space_for(model: nn.Module, spec: DataSpec, background_x: torch.Tensor) -> Space:
    """The space a model's inputs are explained in, for its data kind."""
    if spec.input_kind == "tokens":
        embedding = token_embedding(model, spec.vocab_size)
        if embedding is None:
            return TokenIdSpace(model, spec, background_x)
        return TokenSpace(model, spec, background_x, embedding)
    kinds = {"image": ImageSpace, "sequence": SequenceSpace}
    return kinds.get(spec.input_kind, Space)(model, spec, background_x)
