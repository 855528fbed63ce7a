"""The plan on the console: a few lines of sizes, a memory table, the fit, the launch command."""

from __future__ import annotations

from typing import Dict, List

from bigmodel_cli.plan.memory import HEADROOM, fits, gib
from bigmodel_cli.plan.planner import Plan


def summary_lines(plan: Plan, choices: Dict[str, str]) -> List[str]:
    from bigmodel_cli.build.parts import human_count

    layout, data, world = plan.layout, plan.data, plan.layout.world_size
    dp = layout.dp
    split = f"dp={dp} x tp={layout.tp} x pp={layout.pp}," if layout.tp * layout.pp > 1 else ""
    unit = "replica" if split else "rank"  # a replica's tp and pp ranks read the same batch
    where = "GPUs" if plan.device == "cuda" else "CPU processes"
    per_epoch = (f"{plan.steps_per_epoch:,.4g}" if plan.steps_per_epoch else "unknown (no data files at hand)")
    flops = f"{plan.flops_per_step:.3g}" if plan.flops_per_step else "n/a"
    return [
        f"model      {choices.get('model', '')}: {plan.parameters:,} parameters ({human_count(plan.parameters)})",
        f"world      {world} rank{'s' if world > 1 else ''} on {where}, strategy {layout.strategy if world > 1 else 'single process'}, "
        f"{split} precision {layout.precision}, activation checkpointing {'on' if plan.step.recomputes else 'off'}",
        f"batch      {data.batch_size} per {unit} x {dp} {unit}{'s' if dp > 1 else ''} x {plan.global_batch // (data.batch_size * dp)} "
        f"accumulation = global batch {plan.global_batch:,} samples = {plan.units_per_step:,} {data.unit} per step",
        f"steps      {per_epoch} per epoch; {plan.total_steps:,} in all" if plan.total_steps else f"steps      {per_epoch} per epoch",
        f"FLOPs      {flops} per optimizer step ({plan.flops_how})",
    ]


def memory_table(plan: Plan):
    from rich.table import Table

    table = Table(title=f"Memory per rank ({plan.layout.strategy if plan.layout.world_size > 1 else 'one process'}, "
                        f"{plan.layout.precision})", title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    for name, nbytes in plan.memory.parts.items():
        table.add_row(name, gib(nbytes))
    table.add_row("peak (the parts do not all peak at once)", gib(plan.memory.peak), style="bold")
    return table


def assumptions(plan: Plan) -> List[str]:
    step = plan.step
    forward = "forward in fp32" if plan.layout.precision == "fp32" else f"forward under {plan.layout.precision} autocast"
    out = [f"measured on one simulated step on fake tensors (no memory used): {forward}, loss, backward, clipping, {plan_optimizer(step)}; the peak is in "
           f"the {plan.memory.peak_in}",
           "weights, gradients and optimizer state in fp32 (autocast keeps fp32 master weights); "
           "activations are the tensors saved for backward plus the largest temporaries",
           "not counted: the CUDA context (~0.5 GiB), the caching allocator's slack, NCCL buffers, "
           "torch.compile and kernel workspaces"]
    return out + plan.memory.notes + plan.notes


def plan_optimizer(step) -> str:
    return "the optimizer step (its state is made on the first step and kept)"


def fit_lines(plan: Plan) -> List[str]:
    if plan.gpu is None:
        return ["fits?      no GPU here; give --gpu-memory 80GB (or a card: --gpu-memory H100) to check"]
    usable = (1 - HEADROOM) * plan.gpu.nbytes
    if fits(plan.memory.peak, plan.gpu.nbytes):
        return [f"fits       yes: {gib(plan.memory.peak)} of {plan.gpu.name}'s {gib(plan.gpu.nbytes)} "
                f"(up to {gib(usable)}, {HEADROOM:.0%} left for the CUDA context and the allocator)"]
    lines = [f"fits       NO: {gib(plan.memory.peak)} per rank, {plan.gpu.name} has {gib(plan.gpu.nbytes)} "
             f"(up to {gib(usable)} usable); what would make it fit:"]
    return lines + [f"             {remedy}" for remedy in plan.remedies]


def print_plan(plan: Plan, choices: Dict[str, str]) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for line in summary_lines(plan, choices):
        console.print(line, markup=False)
    console.print(memory_table(plan))
    console.print("assumptions:", markup=False)
    for line in assumptions(plan):
        console.print(f"  - {line}", markup=False)
    for line in fit_lines(plan):
        console.print(line, markup=False)
    console.print(f"launch     {plan.launch}", markup=False)
