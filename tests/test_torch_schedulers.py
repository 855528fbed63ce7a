"""scheduler._target_=torch.optim.lr_scheduler.<Name>: built with its own arguments, after
bigmodel's warmup, stepped once per optimizer step and resumed exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bigmodel_cli.build.parts import build_schedule
from bigmodel_cli.commands.train import train
from bigmodel_cli.errors import UserError
from bigmodel_cli.optim import TorchSchedule, lr_scheduler


BASE = ("model.hidden_sizes=[32]", "model.dropout=0.2", "trainer.log_every=1", "trainer.val_every=10",
        "trainer.progress=plain", "trainer.threads=1", "logger=[jsonl]")


def lrs_of(schedule, steps: int):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, schedule)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.unit
def test_warmup_then_cosine_annealing_over_the_rest_of_the_run():
    node = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "warmup_steps": 3, "T_max": None,
            "eta_min": 0.1, "min_lr_ratio": 0.5}  # min_lr_ratio: a key of scheduler=cosine, not torch's
    schedule = build_schedule(OmegaConf.create(node), total_steps=13)
    assert isinstance(schedule, TorchSchedule) and schedule.kwargs == {"T_max": 10, "eta_min": 0.1}
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert lrs_of(schedule, 13) == pytest.approx([0.25, 0.5, 0.75] + cosine)


@pytest.mark.unit
def test_a_torch_scheduler_without_warmup_is_the_class_itself():
    node = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.StepLR", "warmup_steps": 0, "step_size": 2,
                             "gamma": 0.5})
    assert lrs_of(build_schedule(node, total_steps=6), 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("node,message", [
    ({"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 5, "T_maks": 3},
     "scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR cannot be built (CosineAnnealingLR.__init__() "
     "got an unexpected keyword argument 'T_maks'); it takes T_max, eta_min, last_epoch"),
    ({"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau"}, "steps on a validation metric"),
    ({"_target_": "torch.optim.lr_scheduler.CosineAnealingLR"}, "cannot be imported"),
])
@pytest.mark.unit
def test_a_scheduler_that_cannot_be_built_is_one_line(node, message):
    with pytest.raises(UserError) as caught:
        lrs_of(build_schedule(OmegaConf.create(node), total_steps=10), 1)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_step(run_dir: Path, key: str):
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


@pytest.mark.parametrize("scheduler", [
    ("scheduler=torch_cosine", "scheduler.warmup_steps=6", "scheduler.eta_min=1e-5"),
    # OneCycleLR drives Adam's first beta as well as the LR; total_steps comes from the run.
    ("scheduler=constant", "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "+scheduler.max_lr=0.01"),
], ids=["warmup+cosine", "one-cycle"])
@pytest.mark.integration
def test_a_torch_scheduler_resumes_exactly(compose, tmp_path, scheduler):
    full = tmp_path / "full"
    train(compose(*BASE, *scheduler, "trainer.max_steps=20", "trainer.checkpoint_every=1",
                  "trainer.keep_last=100"), full)
    lrs = per_step(full, "lr")
    assert len(set(lrs.values())) > 10  # the LR moved every step
    for step in (4, 13):  # inside the warmup (or the one-cycle ramp), and after it
        resumed = tmp_path / f"from{step}"
        ckpt = full / "checkpoints" / f"step_{step:08d}.pt"
        train(compose(*BASE, *scheduler, "trainer.max_steps=20", f"trainer.resume={ckpt}"), resumed)
        assert per_step(resumed, "lr") == {s: v for s, v in lrs.items() if s > step}
        assert per_step(resumed, "loss") == {s: v for s, v in per_step(full, "loss").items() if s > step}


@pytest.mark.integration
def test_resume_refuses_a_checkpoint_of_another_kind_of_scheduler(compose, tmp_path):
    first = tmp_path / "first"
    train(compose(*BASE, "trainer.max_steps=4"), first)  # bigmodel's cosine
    with pytest.raises(UserError, match="the checkpoint's LR scheduler is LambdaLR, this run's CosineAnnealingLR"):
        train(compose(*BASE, "scheduler=torch_cosine", "trainer.max_steps=8",
                      f"trainer.resume={first / 'checkpoints'}"), tmp_path / "second")


@pytest.mark.parametrize("first,changed,message", [
    # T_max / total_steps were filled in from the run's length: a longer run would follow the
    # checkpoint's cosine to 0 and back up, and OneCycleLR would fail past its old end.
    (("scheduler=torch_cosine", "trainer.max_steps=8"), ("trainer.max_steps=12",), "T_max=8 there, 12 here"),
    (("scheduler=constant", "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "+scheduler.max_lr=0.05",
      "trainer.max_steps=8"),
     ("trainer.max_steps=12",), "total_steps=8 there, 12 here"),
    (("scheduler=torch_cosine", "scheduler.warmup_steps=2", "trainer.max_steps=8"), ("scheduler.eta_min=0.001",),
     "eta_min=0.0 there, 0.001 here"),
    (("scheduler=constant", "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "+scheduler.max_lr=0.05",
      "trainer.max_steps=8"),
     ("+scheduler.max_lr=0.1",), "max_lr=0.05 there, 0.1 here"),
], ids=["cosine-longer", "one-cycle-longer", "changed-argument", "changed-max-lr"])
@pytest.mark.integration
def test_resume_refuses_a_torch_scheduler_built_differently(compose, tmp_path, first, changed, message):
    train(compose(*BASE, *first, "trainer.checkpoint_every=4"), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "step_00000004.pt"
    overrides = [o for o in first if o.split("=")[0] not in {c.split("=")[0] for c in changed}]
    with pytest.raises(UserError) as caught:
        train(compose(*BASE, *overrides, *changed, f"trainer.resume={ckpt}"), tmp_path / "second")
    assert message in str(caught.value) and "scheduler=cosine" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.integration
def test_bigmodels_cosine_follows_a_longer_run_on_resume(compose, tmp_path):
    train(compose(*BASE, "trainer.max_steps=8", "trainer.checkpoint_every=4"), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "step_00000004.pt"
    train(compose(*BASE, "trainer.max_steps=12", f"trainer.resume={ckpt}"), tmp_path / "longer")
    train(compose(*BASE, "trainer.max_steps=12"), tmp_path / "fresh")
    assert per_step(tmp_path / "longer", "lr") == pytest.approx(
        {s: v for s, v in per_step(tmp_path / "fresh", "lr").items() if s > 4})


@pytest.mark.unit
def test_one_cycle_shorter_than_the_run_is_one_line():
    node = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.1, "total_steps": 5})
    with pytest.raises(UserError, match="scheduler.total_steps=5 is shorter than this run's 10 steps"):
        build_schedule(node, total_steps=10)
