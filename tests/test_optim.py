import math

import pytest
import torch
from hydra.utils import instantiate

from bigmodel_cli.optim import Constant, Cosine, Exponential, StepDecay, build_optimizer, param_groups

pytestmark = pytest.mark.unit

OPTIMIZERS = ["sgd", "momentum", "adam", "adamw", "adagrad", "rmsprop"]


def regression_problem():
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    return model, x, y


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_config_builds_and_descends(compose, name):
    # Defaults suit long runs; a 60-step test needs the adaptive ones a little faster.
    lr = ["optim.lr=0.02"] if name in ("adam", "adamw") else []
    cfg = compose(f"optim={name}", *lr)
    model, x, y = regression_problem()
    opt = build_optimizer(instantiate(cfg.optim), model)
    assert opt.param_groups[0]["lr"] == cfg.optim.lr
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_momentum_and_nesterov_options(compose):
    cfg = compose("optim=momentum", "optim.nesterov=true")
    model, _, _ = regression_problem()
    opt = build_optimizer(instantiate(cfg.optim), model)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True


def test_adamw_skips_weight_decay_on_biases_and_norms(compose):
    cfg = compose("optim=adamw", "optim.weight_decay=0.1")
    model, _, _ = regression_problem()
    opt = build_optimizer(instantiate(cfg.optim), model)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])  # biases and LayerNorm weights
    # _convert_: all hands torch plain containers (an OmegaConf node would not load back
    # from a weights_only checkpoint).
    assert type(opt.defaults["betas"]) in (list, tuple)


def test_param_groups_cover_every_parameter_once():
    model, _, _ = regression_problem()
    groups = param_groups(model, 0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_warmup_is_linear_then_hands_over():
    s = Constant(warmup_steps=4)
    assert [s(i) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_step_decay_and_exponential():
    s = StepDecay(step_size=3, gamma=0.5)
    assert [s(i) for i in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    e = Exponential(gamma=0.9)
    assert e(10) == pytest.approx(0.9 ** 10)


def test_cosine_reaches_its_floor_at_the_last_step():
    s = Cosine(min_lr_ratio=0.1, warmup_steps=10, total_steps=110)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert s(109) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["constant", "step", "exponential", "cosine"])
def test_schedule_configs_drive_lambdalr_and_round_trip(compose, name):
    cfg = compose(f"scheduler={name}")
    model, _, _ = regression_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, instantiate(cfg.scheduler, total_steps=1000))
    for _ in range(200):
        opt.step()
        sched.step()
    lr = opt.param_groups[0]["lr"]
    state = sched.state_dict()
    opt2 = torch.optim.SGD(model.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, instantiate(cfg.scheduler, total_steps=1000))
    sched2.load_state_dict(state)
    assert sched2.get_last_lr()[0] == pytest.approx(lr)
    assert 0 < lr <= 1.0


def test_bad_schedule_values():
    from omegaconf import OmegaConf

    from bigmodel_cli.config_checks import validate_scheduler
    from bigmodel_cli.errors import UserError

    with pytest.raises(UserError, match=r"scheduler.min_lr_ratio must be in \[0, 1\] \(got 2.0\)"):
        validate_scheduler(OmegaConf.create({"scheduler": {"min_lr_ratio": 2.0}}))
    with pytest.raises(UserError, match="scheduler.step_size must be > 0"):
        validate_scheduler(OmegaConf.create({"scheduler": {"step_size": 0}}))
    with pytest.raises(UserError, match="scheduler.warmup_steps must be >= 0"):
        validate_scheduler(OmegaConf.create({"scheduler": {"warmup_steps": -1}}))
