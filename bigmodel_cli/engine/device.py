"""Device choice, autocast precision and seeding: all the torch global state in one place."""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import torch

from bigmodel_cli.engine.threads import plan_threads
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} but no CUDA device is available on this machine; "
                            f"use {key}=cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{key}={name} but this machine has {count} CUDA device(s) "
                            f"(cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"{key}={name} but MPS is not available; use {key}=cpu")
    elif device.type != "cpu":
        raise UserError(f"{key}={name} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def device_type(name: str) -> str:
    """The kind of device trainer.device names ("cuda", "cpu", ...) without checking that this
    machine has one (`bigmodel plan` plans for a cluster from a login node)."""
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":", 1)[0]


def check_precision(precision: str, device: torch.device, key: str = "trainer.precision") -> None:
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{key}=fp16 needs a CUDA GPU (loss scaling); on {device.type} use "
                        f"{key}=bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{key}=bf16 is not supported by this GPU; use {key}=fp16 or fp32")


def autocast(precision: str, device: torch.device):
    """Mixed-precision context for the forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def use_tf32(enabled: bool, device: torch.device) -> None:
    """fp32 matrix products on TF32 tensor cores where the GPU has them. Only for CUDA: on
    other devices "high" could pick reduced-precision CPU kernels, so they keep full fp32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled


def use_threads(setting: str, env=None) -> int:
    """torch's intra-op threads for this rank, as trainer.threads says (engine/threads.py);
    logs how many and why."""
    plan = plan_threads(setting, env)
    torch.set_num_threads(plan.per_rank)
    log.info("threads: %d per rank (%s)", plan.per_rank, plan.why)
    return plan.per_rank


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
