"""A run's plan from its validated config: sizes, steps, FLOPs, memory, fit, launch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from bigmodel_cli.config import TrainerConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.plan.data import PlanData, plan_data
from bigmodel_cli.plan.gpus import Gpu
from bigmodel_cli.plan.memory import Layout, RankMemory, fits, gib, per_rank
from bigmodel_cli.plan.simulate import StepMemory, simulate_step

#: the most GPUs one node holds (DGX-2 and HGX-2 class machines have 16)
MAX_GPUS_PER_NODE = 16


@dataclass
class Plan:
    parameters: int
    device: str  # the device kind the ranks will use: cuda | cpu
    layout: Layout
    data: PlanData
    step: StepMemory
    memory: RankMemory
    global_batch: int
    units_per_step: int
    steps_per_epoch: Optional[float]
    total_steps: Optional[int]
    flops_per_step: Optional[float]
    flops_how: str
    launch: str
    gpu: Optional[Gpu] = None
    remedies: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def target_device(settings: TrainerConfig) -> str:
    """Where the ranks will run. `auto` on a machine without a GPU (a login node) plans for
    the GPUs of the node the job will get."""
    name = str(settings.device).strip().lower()
    return "cpu" if name == "cpu" else "cuda"


def check_world(settings: TrainerConfig, device: str) -> None:
    """More processes on one node than a node could hold: one line."""
    n = settings.devices
    if device == "cuda" and n > MAX_GPUS_PER_NODE:
        per_node = 8 if n % 8 == 0 else MAX_GPUS_PER_NODE
        nodes = math.ceil(n / per_node) * settings.num_nodes
        raise UserError(f"trainer.devices={n} GPUs on one node, but no node holds more than {MAX_GPUS_PER_NODE}; "
                        f"trainer.devices is per node: use trainer.devices={per_node} trainer.num_nodes={nodes}")
    cores = os.cpu_count() or 1
    if device == "cpu" and n > cores:
        raise UserError(f"trainer.devices={n} CPU processes but this machine has {cores} CPU cores; "
                        f"use trainer.devices={cores} or fewer")
    if device == "cpu" and settings.precision == "fp16":
        raise UserError("trainer.precision=fp16 needs a CUDA GPU (loss scaling); on cpu use "
                        "trainer.precision=bf16 or fp32")


def make_plan(cfg: DictConfig, settings: TrainerConfig, choices: dict, overrides: Sequence[str],
              gpu: Optional[Gpu]) -> Plan:
    device = target_device(settings)
    check_world(settings, device)
    from bigmodel_cli.engine.mesh import layout_for

    layout_for(settings.devices * settings.num_nodes, settings.parallel)  # a world that does not factor: one line
    layout = Layout(str(settings.strategy), settings.devices * settings.num_nodes, str(settings.precision),
                    int(settings.parallel.tp), int(settings.parallel.pp))
    data = plan_data(cfg, choices, overrides, layout.dp)  # a replica's tp and pp ranks read the same batches
    if data.note:
        cfg.data = {"_target_": "bigmodel_cli.data.tokens.TokenFiles", "batch_size": data.batch_size,
                    "block_size": data.spec.block_size, "vocab_size": data.spec.vocab_size}
    step = simulate_step(cfg, data.spec, data.batch, layout.precision)
    memory = per_rank(step, layout)
    accum = settings.grad_accum_steps
    global_batch = data.batch_size * accum * layout.dp
    units = global_batch * data.units_per_sample
    per_epoch = data.batches_per_epoch / accum if data.batches_per_epoch else None
    plan = Plan(step.count, device, layout, data, step, memory, global_batch, units, per_epoch,
                total_steps(settings, per_epoch), None, "", launch_command(overrides, settings, data), gpu)
    plan.flops_per_step, plan.flops_how = flops_per_step(cfg, step, data, units, accum * layout.dp)
    if data.note:
        plan.notes.append(data.note)
    if gpu is not None and not fits(memory.peak, gpu.nbytes):
        plan.remedies = remedies(cfg, plan, settings)
    return plan


def total_steps(settings: TrainerConfig, per_epoch: Optional[float]) -> Optional[int]:
    limits = [settings.max_steps] if settings.max_steps is not None else []
    if settings.max_epochs is not None and per_epoch:
        limits.append(max(1, math.ceil(settings.max_epochs * per_epoch)))
    return min(limits) if limits else None


def flops_per_step(cfg: DictConfig, step: StepMemory, data: PlanData, units: int, micro_steps: int):
    """GPT-style LMs: the estimate MFU uses (6N + 12LdT per token); other models: the
    matrix-op FLOPs counted in the simulated step, times the micro-batches of all ranks."""
    from bigmodel_cli.telemetry.efficiency import model_flops_per_token

    per_token = model_flops_per_token(step.model, cfg.model, data.spec.task, data.spec.block_size, step.count)
    if per_token is not None:
        return per_token * units, "6N + 12·L·d·T per token (as MFU counts it)"
    if step.flops:
        return step.flops * micro_steps, "matrix ops counted in the simulated step (forward + backward)"
    return None, "not known for this model"


def launch_command(overrides: Sequence[str], settings: TrainerConfig, data: PlanData) -> str:
    import shlex

    from bigmodel_cli.plan.data import stand_in_overrides

    args = " ".join(shlex.quote(o) for o in overrides if not o.startswith("trainer.dry_run="))
    if data.note:  # planned on a stand-in: train needs data it can read
        args += f" {stand_in_overrides(overrides)} data.dir=<prepared tokens>"
    line = f"bigmodel train {args}".rstrip()
    if settings.num_nodes > 1:
        return (f"on each of the {settings.num_nodes} nodes: MASTER_ADDR=<first node> MASTER_PORT=29500 {line}  "
                f"(or under Slurm: srun --nodes={settings.num_nodes} --ntasks-per-node={settings.devices} {line})")
    if settings.devices > 1:
        return f"{line}  (starts {settings.devices} worker processes itself)"
    return line


def remedies(cfg: DictConfig, plan: Plan, settings: TrainerConfig) -> List[str]:
    """Settings that would bring the per-rank peak under the GPU's memory, each with its peak."""
    gpu, layout, step, out = plan.gpu, plan.layout, plan.step, []
    if layout.dp > 1 and layout.strategy == "ddp" and layout.precision != "fp16":
        sharded = per_rank(step, replace(layout, strategy="fsdp")).peak
        out.append(f"trainer.strategy=fsdp: {gib(sharded)} per rank" + ("" if fits(sharded, gpu.nbytes) else " (still too much)"))
    if "activation_checkpointing" in cfg.model and not cfg.model.activation_checkpointing:
        cfg.model.activation_checkpointing = True
        again = simulate_step(cfg, plan.data.spec, plan.data.batch, layout.precision, count_flops=False)
        cfg.model.activation_checkpointing = False
        peak = per_rank(again, layout).peak
        out.append(f"model.activation_checkpointing=true: {gib(peak)} per rank (~30% more compute)"
                   + ("" if fits(peak, gpu.nbytes) else " (still too much)"))
    smaller = smaller_batch(plan, settings)
    if smaller:
        out.append(smaller)
    if not out:
        out.append("a smaller model, more devices with trainer.strategy=fsdp, or a GPU with more memory")
    return out


def smaller_batch(plan: Plan, settings: TrainerConfig) -> Optional[str]:
    """Halve data.batch_size (activations shrink with it, the optimizer step's peak does not)
    and accumulate to keep the global batch."""
    memory, batch = plan.memory, plan.data.batch_size
    activations = memory.parts["activations"]

    def peak(size: int) -> float:
        return max(memory.passed - activations * (1 - size / batch), memory.updated)

    size = batch // 2
    while size >= 1 and not fits(peak(size), plan.gpu.nbytes):
        size //= 2
    if size < 1:
        return None
    accum = settings.grad_accum_steps * batch // size
    return (f"data.batch_size={size} trainer.grad_accum_steps={accum} (same global batch): about "
            f"{gib(peak(size))} per rank (activations scale with the batch)")
