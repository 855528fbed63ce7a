"""`bigmodel plan`'s per-rank memory against the measured peak of a real training step.

For each configuration: the plan's peak (bigmodel_cli/plan), and the peak of tensor memory
that one real step of the real Trainer allocates (build_run, then Trainer.train_step),
on every rank. Measured are tensors, not RSS: the bytes of the weights, buffers and
optimizer state live when the step starts (by storage), plus the most that the CPU
allocator held beyond them during the step (torch.profiler's memory events). The step
measured is the second, when the optimizer state exists (the first creates it). The
figures are in bench/RESULTS.md.

    python bench/plan_memory.py              # the configurations below
    python bench/plan_memory.py --tiny       # small sizes (what tests/test_plan.py checks)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPT_SMALL = ["model=gpt_small", "data=text", "data.block_size=256", "data.batch_size=12"]
TINY_GPT = ["model=gpt", "model.n_layer=2", "model.n_embd=64", "data=text", "data.block_size=64",
            "data.batch_size=8"]
QUIET = ["trainer.threads=1", "trainer.val_at_start=false", "logger=[jsonl]"]

CONFIGS = {
    "gpt_small fp32, 1 process": (GPT_SMALL, 1),
    "gpt_small fp32, activation checkpointing": (GPT_SMALL + ["model.activation_checkpointing=true"], 1),
    "gpt_small bf16, 1 process": (GPT_SMALL + ["trainer.precision=bf16"], 1),
    "gpt_small fp32, FSDP over 2 ranks": (GPT_SMALL + ["trainer.devices=2", "trainer.strategy=fsdp"], 2),
    "gpt_small fp32, DDP over 2 ranks": (GPT_SMALL + ["trainer.devices=2"], 2),
    "cnn on digits, 1 process": (["model=cnn", "data.batch_size=256"], 1),
}
TINY = {
    "tiny gpt fp32, 1 process": (TINY_GPT, 1),
    "tiny gpt fp32, activation checkpointing": (TINY_GPT + ["model.activation_checkpointing=true"], 1),
    "tiny gpt fp32, FSDP over 2 ranks": (TINY_GPT + ["trainer.devices=2", "trainer.strategy=fsdp"], 2),
}


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bigmodel_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[*overrides, *QUIET], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def planned_peak(overrides: Sequence[str]) -> int:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from bigmodel_cli.config import trainer_settings
    from bigmodel_cli.config_checks import validate_train_config
    from bigmodel_cli.plan.planner import make_plan

    cfg = compose(overrides)
    choices = dict(cfg.hydra.runtime.choices)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    validate_train_config(cfg)
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return make_plan(plain, trainer_settings(cfg), choices, list(overrides), None).memory.peak


def live_tensor_bytes(trainer) -> int:
    """Bytes of the distinct storages of weights, buffers, gradients and optimizer state."""
    import torch

    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    tensors += [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    local = [getattr(t, "_local_tensor", t) for t in tensors]  # FSDP's DTensors: this rank's shard
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}.values())


def allocated_peak(prof) -> int:
    """The most that the allocator held, beyond what it held when profiling began."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if type(event.extra_fields).__name__.endswith("Allocation"):
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


def measure_rank(overrides: Sequence[str]) -> int:
    """One rank's measured peak: build the run as train does, step once, profile the next step."""
    import torch
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile

    from bigmodel_cli.config import trainer_settings
    from bigmodel_cli.config_checks import validate_train_config
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.build.training import Placement, build_run

    cfg = compose(overrides)
    choices = dict(cfg.hydra.runtime.choices)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate_train_config(cfg)
    env = distributed.detect()
    distributed.init(env, "gloo", torch.device("cpu"), 300)
    with tempfile.TemporaryDirectory() as run_dir:
        run = build_run(cfg, Path(run_dir), choices, Placement(torch.device("cpu"), env), trainer_settings(cfg))
        trainer = run.trainer
        trainer.model.train()
        batches = trainer.micro_batches()
        trainer.train_step(batches, False)
        base = live_tensor_bytes(trainer)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.train_step(batches, False)
        run.telemetry.close()
    return base + allocated_peak(prof)


def _rank_main(rank: int, world: int, port: int, overrides: List[str], out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    peak = measure_rank(overrides)
    Path(out, f"rank{rank}").write_text(str(peak))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def measured_peak(overrides: Sequence[str], ranks: int) -> int:
    """The largest peak over the ranks (several: each in its own process, gloo on CPU)."""
    import torch.multiprocessing as mp

    if ranks == 1:
        return measure_rank(overrides)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(ranks, port, list(overrides), out), nprocs=ranks,
                           start_method="spawn")
        return max(int(p.read_text()) for p in Path(out).glob("rank*"))


def compare(configs: Dict[str, tuple]) -> List[tuple]:
    rows = []
    for name, (overrides, ranks) in configs.items():
        planned, measured = planned_peak(overrides), measured_peak(overrides, ranks)
        rows.append((name, planned, measured, (planned - measured) / measured))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small sizes tests/test_plan.py checks")
    args = parser.parse_args()
    print("| configuration | planned per rank (MiB) | measured peak (MiB) | error |")
    print("|---|---:|---:|---:|")
    for name, planned, measured, error in compare(TINY if args.tiny else CONFIGS):
        print(f"| {name} | {planned / 2**20:,.2f} | {measured / 2**20:,.2f} | {error:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
