"""How well the hardware is used: model FLOPs utilisation (MFU) and peak memory.

MFU = achieved model FLOPs per second / the accelerator's peak. Model FLOPs follow the
standard transformer estimate (PaLM, appendix B; as nanoGPT computes it): per token,
6 x parameters for the matrix multiplies of forward and backward, plus 12 x layers x
width x context for attention. It is defined for GPT-style language models on a GPU
whose peak is in the table below; anywhere else MFU is left out, never guessed.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch

from bigmodel_cli.models.description import flops_of

# Dense peak FLOP/s by GPU model (substring of torch.cuda.get_device_name) and math mode:
# "half" for bf16/fp16 tensor cores, "tf32" for fp32 matmuls on TF32 tensor cores, "fp32"
# for plain fp32. From the vendors' data sheets (SXM parts; without sparsity).
PEAK_FLOPS = {
    "H200": {"half": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100": {"half": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"half": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"half": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "L4": {"half": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "V100": {"half": 125e12, "fp32": 15.7e12},
}


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """The device's dense peak for this precision, or None when it is not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if precision in ("bf16", "fp16"):
        mode = "half"
    else:
        mode = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    for model, table in PEAK_FLOPS.items():
        if model in name:  # GPUs without TF32 (V100) run fp32 products in fp32
            return table.get(mode) or table.get("fp32")
    return None


def transformer_flops_per_token(n_params: int, n_layer: int, width: int, context: int) -> float:
    """Training FLOPs per token (forward + backward) of a decoder-only transformer."""
    return 6.0 * n_params + 12.0 * n_layer * width * context


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors have held; CPU: the process's maximum resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state this rank holds: its own shards of
    split (DTensor) tensors, all of plain ones. Metadata only: no device sync."""
    def local(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return {"params": sum(local(p) for p in params),
            "grads": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local(v) for v in state)}


def knows_flops_per_token(model: torch.nn.Module, task: str) -> bool:
    """Whether model_flops_per_token has an estimate for this model (so a planner need not
    count its step's matrix ops): a decoder language model that says its depth and width."""
    own = getattr(model, "config", None)
    answers = isinstance(getattr(own, "num_hidden_layers", None), int) and isinstance(getattr(own, "hidden_size", None), int)
    return task == "language_modeling" and (answers or flops_of(model) is not None)


def model_flops_per_token(model: torch.nn.Module, model_cfg, task: str, context: Optional[int],
                          n_params: int) -> Optional[float]:
    """The estimate above for a decoder language model, None for any other model. A Hugging
    Face model's depth and width come from its own config object (num_hidden_layers,
    hidden_size, which every transformers config answers to); one of ours says by which model
    config keys, and which position table to leave out of the count (models/description.py)."""
    if task != "language_modeling" or not context:
        return None
    own = getattr(model, "config", None)
    n_layer, width = getattr(own, "num_hidden_layers", None), getattr(own, "hidden_size", None)
    described = flops_of(model)
    if not (isinstance(n_layer, int) and isinstance(width, int)) and described is not None:
        n_layer, width = model_cfg.get(described.layers_key), model_cfg.get(described.width_key)
        positions = getattr(model, described.positions, None) if described.positions else None
        if isinstance(positions, torch.nn.Embedding):  # (absent on a pipeline rank without the first stage)
            n_params -= positions.weight.numel()
    if not n_layer or not width:
        return None
    return transformer_flops_per_token(n_params, n_layer, width, context)
