"""Live tensor bytes during a training step, counted per storage and by kind.

Each op's outputs are seen under a TorchDispatchMode; a storage not seen before is a new
allocation, and a weak reference to it tells when it is freed (storages and tensors keep
their Python objects while C++ holds them, e.g. autograd's saved tensors, so the callback
fires when the memory would really be released). Views share their base's storage and
in-place ops return it, so neither is counted twice. This works the same on real and on
fake tensors, which is what lets `plan` measure a step that never allocates.
"""

from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: the kinds of bytes, as the plan reports them
KINDS = ("parameters", "gradients", "optimizer", "weight_casts", "activations")


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages, by kind, and the largest total seen (with its breakdown)."""

    def __init__(self) -> None:
        super().__init__()
        self.kind_of: Dict[int, str] = {}
        self.size_of: Dict[int, int] = {}
        self.live = {kind: 0 for kind in KINDS}
        self.peak = 0
        self.at_peak = dict(self.live)
        self.phase = "activations"  # the kind of a new allocation that nothing else claims
        self.params: set = set()  # storage keys of the parameters

    # ------------------------------------------------------------ counting
    def add(self, tensor: torch.Tensor, kind: str) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.size_of:
            return
        size = storage.nbytes()
        self.size_of[key], self.kind_of[key] = size, kind
        self.live[kind] += size
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        size, kind = self.size_of.pop(key, 0), self.kind_of.pop(key, None)
        if kind is not None:
            self.live[kind] -= size

    def relabel(self, tensors: Iterable[Optional[torch.Tensor]], kind: str) -> None:
        """Count these (live) tensors' storages as `kind` from now on (a gradient is only
        known to be one once autograd stores it in .grad)."""
        for tensor in tensors:
            if tensor is None:
                continue
            key = storage_key(tensor)
            old = self.kind_of.get(key)
            if old is not None and old != kind:
                self.live[old] -= self.size_of[key]
                self.live[kind] += self.size_of[key]
                self.kind_of[key] = kind

    def total(self) -> int:
        return sum(self.live.values())

    def note_peak(self) -> None:
        total = self.total()
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.live)

    # ------------------------------------------------------------ the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = self.phase
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) \
                and storage_key(args[0]) in self.params:
            kind = "weight_casts"  # autocast's low-precision copy of a weight, kept for the pass
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.add(tensor, kind)
        self.note_peak()
        return out
