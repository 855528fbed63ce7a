"""GPU memory for the fit check: the GPU in this machine, or `--gpu-memory` (a size or a card).

Torch-free, so that cli.py can read the flag before Hydra sees the arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from bigmodel_cli.errors import UserError

GIB = 2**30

#: memory (GiB) of common cards, by a substring of the name torch.cuda reports; the more
#: specific names first (A100-SXM4-40GB before A100)
CARDS = (("H200", 141), ("H100", 80), ("A100-SXM4-40GB", 40), ("A100-PCIE-40GB", 40), ("A100", 80),
         ("L40S", 48), ("L40", 48), ("A6000", 48), ("A10G", 24), ("A10", 24), ("L4", 24),
         ("RTX 4090", 24), ("RTX 3090", 24), ("V100-SXM2-32GB", 32), ("V100", 16), ("T4", 16))

FLAG = "--gpu-memory"
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Gpu:
    name: str
    nbytes: int


def card(name: str) -> Optional[Gpu]:
    for key, gib in CARDS:
        if key.lower() in name.lower():
            return Gpu(name, gib * GIB)
    return None


def parse_gpu(text: str) -> Gpu:
    """'80GB', '80GiB', '80' (GiB) or a card's name ('H100', 'A100-SXM4-40GB')."""
    match = SIZE.match(text)
    if match:
        return Gpu(f"{float(match.group(1)):g} GiB GPU", int(float(match.group(1)) * GIB))
    found = card(text)
    if found is None:
        names = ", ".join(key for key, _ in CARDS)
        raise UserError(f"{FLAG} {text!r} is neither a size (80GB) nor a known card ({names})")
    return found


def take_gpu_flag(args: List[str]) -> Tuple[List[str], Optional[Gpu]]:
    """The arguments without `--gpu-memory X` / `--gpu-memory=X`, and the GPU it names."""
    rest, gpu, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == FLAG:
            if i + 1 >= len(args):
                raise UserError(f"{FLAG} needs a value, e.g. {FLAG} 80GB or {FLAG} H100")
            gpu, i = parse_gpu(args[i + 1]), i + 2
            continue
        if arg.startswith(FLAG + "="):
            gpu = parse_gpu(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest, gpu


def local_gpu() -> Optional[Gpu]:
    """The first CUDA GPU here, with the memory torch reports for it."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return Gpu(props.name, int(props.total_memory))


#: set by cli.py from --gpu-memory before the plan command runs
REQUESTED: Optional[Gpu] = None
