"""Pipeline parallelism, the running: a training step through torch.distributed.pipelining's
schedules, forward-only evaluation, and the gradients made global across stages.

The numbers are a single process's: the loss is computed on the last stage, each
micro-batch's scaled by 1 / (micro-batches x accumulation), so the gradients are those of
the mean loss over the step's global batch (the batch must split into equal micro-batches);
a parameter tied across stages (GPT's embedding and head) gets the sum of both stages'
gradients; data-parallel replicas average theirs over mesh["dp"]; the gradient norm for
clipping and the non-finite check is the norm over all stages' parameters (each counted
once). No host syncs per step: the loss reaches rank 0 at log steps only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.device import autocast
from bigmodel_cli.engine.distributed import local_part
from bigmodel_cli.engine.pipeline import PipelineCut, check_microbatches, cut_of, microbatches

log = logging.getLogger("bigmodel")


def reduced_by_fsdp(grad: torch.Tensor) -> bool:
    """Whether FSDP reduce-scattered this gradient over the replicas (it is sharded over "dp")."""
    mesh = getattr(grad, "device_mesh", None)
    return mesh is not None and "dp" in (mesh.mesh_dim_names or ())


def skip_reduction(grad_scale_factor: int) -> None:
    """A stage's gradient reduction, held back (gradients are scaled in the loss instead)."""


SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


class PipelineStep:
    """One rank's share of a pipeline-parallel run: built by the Trainer when pp > 1."""

    def __init__(self, cut: PipelineCut, trainer):
        from torch.distributed import pipelining

        parallel = trainer.settings.parallel
        check_microbatches(parallel, trainer.train_loader.batch_size)
        self.cut, self.trainer = cut, trainer
        mesh = trainer.mesh
        self.pp_group = mesh["pp"].get_group()
        self.pp_ranks: List[int] = dist.get_process_group_ranks(self.pp_group)  # global rank of each stage rank
        self.dp = mesh["dp"].size()
        self.dp_group = mesh["dp"].get_group() if self.dp > 1 else None
        self.n_micro = microbatches(parallel)
        self.loss_scale = 1.0 / (self.n_micro * trainer.accum)
        stages = [pipelining.PipelineStage(stage, stage.index, cut.n_stages, trainer.device, group=self.pp_group)
                  for stage in cut.stages]
        self.sharded_stages = stages if trainer.settings.strategy == "fsdp" else []
        schedule = getattr(pipelining, SCHEDULES[parallel.schedule])
        # Gradients are scaled in the loss (scale_grads would rescale what earlier accumulation steps left).
        self.schedule = schedule(stages if parallel.schedule == "interleaved_1f1b" else stages[0],
                                 self.n_micro, loss_fn=self.loss, scale_grads=False)
        self.tie_groups = self.tied_groups(mesh)
        model = trainer.raw_model
        self.tied = [(model.get_parameter(name), self.tie_groups[ranks]) for name, ranks in cut.shared.items()]
        # Each parameter counts once in the global norm: a tied one on the first rank that holds it.
        skip = {id(model.get_parameter(n)) for n, ranks in cut.shared.items() if ranks[0] != cut.pp_rank}
        self.norm_params = [p for p in trainer.params if id(p) not in skip]
        log.info("pipeline: %d stages (%s here), schedule %s, %d micro-batches of %d",
                 cut.n_stages, ", ".join(f"{s.index}: blocks {s.blocks.start}-{s.blocks.stop - 1}" for s in cut.stages),
                 parallel.schedule, self.n_micro, trainer.train_loader.batch_size // self.n_micro)

    def tied_groups(self, mesh) -> Dict[tuple, dist.ProcessGroup]:
        """A process group per set of pp ranks sharing a parameter, within each replica (every
        rank creates every group, in the same order, as torch requires)."""
        groups = {}
        layout = self.trainer.layout
        for ranks in self.cut.tie_ranks:
            if len(ranks) == layout.pp:
                groups[ranks] = self.pp_group
                continue
            replicas = [[q * layout.dp * layout.tp + d * layout.tp + t for q in ranks]
                        for d in range(layout.dp) for t in range(layout.tp)]
            groups[ranks], _ = dist.new_subgroups_by_enumeration(replicas)
        return groups

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.trainer.task.loss(output, target) * self.loss_scale

    # ------------------------------------------------------------------ training
    def train_step(self, batches: Iterator, want_grad_norm: bool):
        """One optimizer step over `accum` pipeline steps. Returns (mean loss on the last stage,
        zero elsewhere; the global grad norm or None), as device tensors."""
        trainer = self.trainer
        losses: list = []  # the last stage's scaled micro-batch losses: they add up to the step's mean
        for micro in range(trainer.accum):
            x, y = trainer.next_batch(batches)
            inputs = (x,) if self.cut.has_first else ()
            step_losses: list = []  # (the schedule empties the list it is given)
            with autocast(trainer.precision, trainer.device), self.gradient_sync(micro == trainer.accum - 1):
                self.schedule.step(*inputs, target=y if self.cut.has_last else None,
                                   losses=step_losses if self.cut.has_last else None)
            losses.extend(step_losses)
        self.reduce_gradients()
        grad_norm = None
        if trainer.grad_clip is not None or want_grad_norm or trainer.skip_nonfinite:
            grad_norm = self.clip_gradients(trainer.grad_clip)
        trainer.apply_update(grad_norm)
        loss = torch.stack(losses).sum() if losses else torch.zeros((), device=trainer.device)
        return loss.detach(), grad_norm

    @contextmanager
    def gradient_sync(self, enabled: bool):
        """FSDP-sharded stages reduce-scatter at the end of a step's last accumulation pass only:
        torch's schedules end every pipeline step with the stages' reduction, which is held
        back on the others (the unsharded gradients accumulate, as under FSDP's no-sync)."""
        if enabled or not self.sharded_stages:
            yield
            return
        for stage in self.sharded_stages:
            stage.perform_reduce_grad = skip_reduction  # (an instance attribute hides the method)
        try:
            yield
        finally:
            for stage in self.sharded_stages:
                del stage.perform_reduce_grad

    def reduce_gradients(self) -> None:
        """Tied parameters: the sum of their stages' gradients. Replicas: the mean of theirs,
        for what FSDP did not already reduce (everything under ddp; under fsdp, loose parameters)."""
        for param, group in self.tied:
            if param.grad is not None:
                dist.all_reduce(local_part(param.grad), group=group)
        if self.dp_group is not None:
            grads = [p.grad for p in self.trainer.params if p.grad is not None and not reduced_by_fsdp(p.grad)]
            distributed.average_over_replicas([local_part(g) for g in grads], self.dp_group, self.dp)

    def clip_gradients(self, max_norm: Optional[float]) -> torch.Tensor:
        """The 2-norm over every stage's gradients (each stage's made whole over its tp and
        fsdp shards, then all-reduced over the pp group), and the gradients clipped to
        `max_norm` with it (as torch's clip_grad_norm_ does in one process)."""
        squares = distributed.grad_norm(self.norm_params).to(self.trainer.device).square()
        dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt()
        if max_norm is not None:
            distributed.clip_with_norm(self.trainer.params, max_norm, total)
        return total

    def global_loss(self, mean_loss: torch.Tensor) -> torch.Tensor:
        """The last stages' mean loss, averaged over replicas (a log-step collective; the
        other stages add zeros, and each of a last stage's tp ranks adds the same loss)."""
        total = mean_loss.detach().clone()
        dist.all_reduce(total)
        return total / (self.dp * self.trainer.layout.tp)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Metrics over this replica's share of a split, forward only through the stages;
        the last stages' sums are added over replicas and shared with every rank."""
        trainer = self.trainer
        model = trainer.raw_model
        was_training = model.training
        model.eval()
        share = trainer.share
        loader = trainer.data.eval_batches(split, rank=share.rank, world_size=share.world_size)
        count = len(loader) if max_batches is None else min(len(loader), max_batches)
        sums = None
        for _, (x, y) in zip(range(count), loader):
            with autocast(trainer.precision, trainer.device):
                output = self.forward_only(x)
            if output is not None:
                stats = trainer.task.batch_sums(output, y)
                sums = stats if sums is None else sums + stats
        model.train(was_training)
        if sums is not None and self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
        box = [sums.tolist() if sums is not None else None]
        dist.broadcast_object_list(box, src=self.pp_ranks[-1], group=self.pp_group)
        if box[0] is None:
            from bigmodel_cli.errors import UserError

            raise UserError(f"the {split} split is empty")
        return trainer.task.finalize(torch.tensor(box[0], dtype=torch.float64))

    def forward_only(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The batch through this rank's stages in order, activations passed point to point;
        the output on the rank of the last stage, None elsewhere."""
        pp = self.cut.pp_size
        h = None
        for stage in self.cut.stages:
            if stage.is_first:
                h = x
            else:
                h = recv_tensor(self.pp_ranks[(stage.index - 1) % pp], self.pp_group, self.trainer.device)
            h = stage(h)
            if not stage.is_last:
                send_tensor(h, self.pp_ranks[(stage.index + 1) % pp], self.pp_group)
        return h if self.cut.has_last else None


# Activations between stages: a fixed-size header (dtype, rank of the shape, the sizes), then the data.
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HEADER = 8


def send_tensor(tensor: torch.Tensor, dst: int, group) -> None:
    header = [DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    header += [0] * (HEADER - len(header))
    dist.send(torch.tensor(header, dtype=torch.int64, device=tensor.device), dst=dst, group=group)
    dist.send(tensor.contiguous(), dst=dst, group=group)


def recv_tensor(src: int, group, device: torch.device) -> torch.Tensor:
    header = torch.empty(HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    code, ndim, *sizes = header.tolist()
    tensor = torch.empty(sizes[:ndim], dtype=DTYPES[code], device=device)
    dist.recv(tensor, src=src, group=group)
    return tensor


def pipeline_step_for(trainer) -> Optional[PipelineStep]:
    """The Trainer's pipeline path, or None when the model was not cut into stages."""
    cut = cut_of(trainer.raw_model)
    return PipelineStep(cut, trainer) if cut is not None else None

