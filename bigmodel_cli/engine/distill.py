"""Knowledge distillation: the student also learns the teacher's softened outputs.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

(Hinton et al., 2015; T^2 keeps the soft term's gradients on the task loss's scale as T
grows). The teacher is a trained checkpoint that the builder opens through the one inference loader
(build/training.py's `training_objective`, build/inference.py; its stored config vetted by
trust.py): frozen, in eval mode, on the run's device, and run under the same autocast
precision as the student. Under DDP every
rank holds its own copy and teaches its own share of the batch; the teacher is never
wrapped, so it takes no part in the gradient all-reduce.

The Trainer knows none of this: it calls its `objective(x, output, y)` and logs the terms
it returns (`distill_kl`, `task_loss`) at log steps, without a host sync per step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine.device import autocast
from bigmodel_cli.engine.logits import logits_of
from bigmodel_cli.engine.tasks import Task

#: tasks whose outputs are distributions the student can be taught
DISTILLABLE = ("classification", "language_modeling")


class TaskObjective:
    """The training loss of a plain run: the task's own, with no extra terms to log."""

    terms: Tuple[str, ...] = ()

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, x: torch.Tensor, output: torch.Tensor, y: torch.Tensor
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.task.loss(output, y), None


class Distillation:
    """The distillation loss (module docstring); its terms, detached, for the log."""

    terms: Tuple[str, ...] = ("distill_kl", "task_loss")

    def __init__(self, task: Task, teacher: nn.Module, temperature: float, alpha: float,
                 precision: str, device: torch.device):
        self.task, self.teacher = task, teacher
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.precision, self.device = precision, device

    def __call__(self, x: torch.Tensor, output: torch.Tensor, y: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast(self.precision, self.device):
            teacher_logits = logits_of(self.teacher(x))
        kl = soft_kl(output, teacher_logits, self.temperature)
        task_loss = self.task.loss(output, y)
        loss = self.alpha * kl + (1.0 - self.alpha) * task_loss
        return loss, torch.stack([kl.detach(), task_loss.detach()])


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the predictions
    (samples, or every token position of a language model), in fp32."""
    classes = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def mismatch(teacher: DataSpec, student: DataSpec, teacher_data: dict, student_data: dict) -> Optional[str]:
    """How the teacher's data differs from the student's in a way that makes its outputs
    meaningless to the student, or None."""
    if teacher.task != student.task:
        return f"it was trained for {teacher.task}, this run is {student.task}"
    if student.task not in DISTILLABLE:
        return f"distillation needs a classification or language-modelling task, not {student.task}"
    if student.task == "language_modeling" and teacher.vocab_size != student.vocab_size:
        return f"its vocabulary has {teacher.vocab_size} tokens, this data's {student.vocab_size}"
    if teacher.num_outputs != student.num_outputs:
        return f"it has {teacher.num_outputs} classes, this data {student.num_outputs}"
    if tuple(teacher.input_shape) != tuple(student.input_shape) or teacher.input_kind != student.input_kind:
        return (f"it reads {teacher.input_kind} {tuple(teacher.input_shape)}, this data gives "
                f"{student.input_kind} {tuple(student.input_shape)}")
    for key in ("vocab", "tokenizer", "labels"):  # same sizes are not enough: the same ids must mean the same
        if key in teacher_data and key in student_data and teacher_data[key] != student_data[key]:
            return f"its {key} differs from this data's (the same ids would mean different tokens)"
    return None
