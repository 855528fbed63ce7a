"""`bigmodel lr-find` (issue 14, LR finder and acceptance 4): the range test's smoothing,
stop and suggestion rules on synthetic curves; the command on digits and on the char GPT,
whose suggestion trains at least as well as the default lr; and its bad input, one line."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
from conftest import outcome_lines

from bigmodel_cli.config import LrFindConfig
from bigmodel_cli.engine.lr_range import ExponentialRamp, RangeTest, as_override, ramp_lrs, suggest
from bigmodel_cli.help import describe_key


#: the same numbers on any machine load (trainer.threads=auto sizes by idle CPUs)
PINNED = ("trainer.threads=1", "trainer.progress=plain")


def curve(lrs, valley=1e-2, drop=2.0, floor=0.3):
    """A loss that falls by `drop` around lr valley/10 and blows up beyond `valley`."""
    out = []
    for lr in lrs:
        x = math.log10(lr / (valley / 10))
        fall = drop / (1 + math.exp(-3 * x))  # steepest at valley / 10
        climb = max(0.0, math.log10(lr / valley)) * 20
        out.append(floor + drop - fall + climb)
    return out


# ------------------------------------------------------------------ the rules


@pytest.mark.unit
def test_the_ramp_runs_geometrically_from_min_to_max_lr():
    lrs = ramp_lrs(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10.0] * 6)
    ramp = ExponentialRamp(1e6, total_steps=7)  # what LambdaLR multiplies optim.lr (= min_lr) by
    assert [1e-6 * ramp(s) for s in range(7)] == pytest.approx(lrs)


@pytest.mark.unit
def test_the_smoothed_loss_is_a_bias_corrected_moving_average():
    test = RangeTest(beta=0.9)
    for loss in (2.0, 2.0, 2.0):
        test.add(1e-3, loss)
    assert test.smoothed == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0 at the start
    test = RangeTest(beta=0.5)
    for loss in (4.0, 2.0):
        test.add(1e-3, loss)
    # average after two: 0.5 * (0.5 * 4) + 0.5 * 2 = 2, over 1 - 0.5^2 = 0.75
    assert test.smoothed == pytest.approx([4.0, 2.0 / 0.75])
    assert test.losses == [4.0, 2.0]


@pytest.mark.unit
def test_the_test_stops_when_the_smoothed_loss_diverges_or_is_not_finite():
    flat = RangeTest(beta=0.0, diverge_factor=4.0)
    assert not any(flat.add(1e-3, 1.0) for _ in range(50)) and flat.stop_reason is None
    rising = RangeTest(beta=0.0, diverge_factor=4.0)
    stops = [rising.add(1e-3, loss) for loss in (1.0, 0.5, 1.9, 2.1)]
    assert stops == [False, False, False, True]  # 2.1 > 4 x 0.5
    assert "exceeded 4x its lowest" in rising.stop_reason
    for bad in (math.nan, math.inf):
        broken = RangeTest()
        assert not broken.add(1e-3, 1.0)
        assert broken.add(1e-2, bad) and str(bad) in broken.stop_reason
        assert len(broken.losses) == 1  # the non-finite point is not part of the curve


@pytest.mark.unit
def test_the_suggestion_is_the_steepest_fall_before_the_lowest_point():
    lrs = ramp_lrs(1e-7, 10.0, 100)
    losses = curve(lrs, valley=1e-2)
    found = suggest(lrs, losses)
    assert found is not None
    assert 1e-3 / 1.5 < found.lr < 1e-3 * 1.5  # valley / 10, where the synthetic loss falls fastest
    assert found.min_loss_lr == pytest.approx(lrs[losses.index(min(losses))])
    assert found.lr < found.min_loss_lr


@pytest.mark.unit
def test_the_climb_after_the_minimum_never_counts():
    lrs = ramp_lrs(1e-5, 1.0, 60)
    losses = curve(lrs, valley=1e-2)
    lowest = losses.index(min(losses))
    # a sharp drop on the climb after the minimum (a lucky batch) is not a descent to use
    assert losses[lowest + 5] > losses[lowest] + 5
    losses[lowest + 6] = losses[lowest] + 0.5
    found = suggest(lrs, losses)
    assert found is not None and found.index < lowest and 1e-3 / 1.5 < found.lr < 1e-3 * 1.5


@pytest.mark.unit
def test_no_suggestion_without_a_descent():
    lrs = ramp_lrs(1e-4, 1.0, 30)
    assert suggest(lrs, [1.0 + i for i in range(30)]) is None  # rising from the start
    assert suggest(lrs, [1.0] * 30) is None  # flat
    assert suggest(lrs[:2], [2.0, 1.0]) is None  # too few points


@pytest.mark.unit
def test_a_noisy_start_is_not_taken_for_the_descent():
    lrs = ramp_lrs(1e-7, 10.0, 100)
    losses = curve(lrs, valley=1e-2)
    losses[1] -= 1.0  # one lucky batch at the very start
    found = suggest(lrs, losses)
    assert 1e-3 / 1.5 < found.lr < 1e-3 * 1.5


@pytest.mark.unit
def test_the_override_has_two_significant_digits():
    assert as_override(3.16e-3) == "optim.lr=3.2e-3"
    assert as_override(0.1) == "optim.lr=1.0e-1"
    assert as_override(12.5) == "optim.lr=1.2e1"


@pytest.mark.unit
def test_every_lr_find_key_has_a_description():
    missing = [f.name for f in dataclasses.fields(LrFindConfig) if not describe_key(LrFindConfig, f.name)]
    assert not missing


# ------------------------------------------------------------------ the command


def suggested_lr(result) -> float:
    match = re.search(r"^suggested: optim\.lr=(\S+)$", result.stdout, re.M)
    assert match, result.output
    return float(match.group(1))


def lr_find_dir(result):
    dirs = sorted(p for p in (result.cwd / "outputs" / "lr_find").glob("*/*") if p.is_dir())
    assert len(dirs) == 1, result.output
    return dirs[0]


def assert_no_training_left(cwd):
    outputs = cwd / "outputs"
    assert not list(outputs.rglob("checkpoints")) and not list(outputs.rglob("*.pt"))
    assert not list(outputs.rglob("metrics.jsonl")) and not list(outputs.rglob("summary.json"))
    assert sorted(p.name for p in outputs.iterdir()) == ["lr_find"]  # no train run dir beside it


def find_on_digits(run_cli):
    """`bigmodel lr-find` on digits: its result, and the suggested lr."""
    found = run_cli("lr-find", *PINNED)
    assert found.returncode == 0, found.output
    return found, suggested_lr(found)


@pytest.mark.integration
def test_lr_find_on_digits_writes_its_curve_and_suggestion(run_cli):
    """Acceptance 4 on digits, the command: its curve, its settings and its suggestion, with
    no training run left behind. (The suggestion trains well: the test below.)"""
    found, lr = find_on_digits(run_cli)
    folder = lr_find_dir(found)
    assert str(folder) in found.stdout
    assert (folder / "lr_find.png").stat().st_size > 10_000
    saved = json.loads((folder / "lr_find.json").read_text())
    assert saved["suggestion"]["override"] == f"optim.lr={lr:.1e}".replace("e-0", "e-")
    assert len(saved["lrs"]) == len(saved["losses"]) == len(saved["smoothed"]) == saved["steps"] <= 100
    assert saved["settings"] == {"min_lr": 1e-7, "max_lr": 10.0, "num_steps": 100, "smoothing": 0.9,
                                 "diverge_factor": 4.0}
    assert_no_training_left(found.cwd)


@pytest.mark.accuracy
def test_lr_find_on_digits_suggests_an_lr_that_trains_as_well_as_the_default(run_cli):
    """Acceptance 4 on digits: `bigmodel train optim.lr=<suggested>` reaches the default run's
    test accuracy or better."""
    _, lr = find_on_digits(run_cli)
    default = run_cli("train", *PINNED)
    tuned = run_cli("train", f"optim.lr={lr}", *PINNED)
    assert default.returncode == 0 and tuned.returncode == 0, default.output + tuned.output
    accuracy = [json.loads((r.run_dirs()[i] / "summary.json").read_text())["test"]["accuracy"]
                for i, r in ((0, default), (1, tuned))]
    assert accuracy[1] >= accuracy[0], f"optim.lr={lr}: {accuracy}"


@pytest.mark.accuracy
def test_lr_find_on_the_char_gpt_suggests_an_lr_that_beats_the_default_at_equal_steps(run_cli):
    """Acceptance 4 on the char GPT: test loss after the same 300 steps, default lr vs suggested."""
    found = run_cli("lr-find", "model=gpt", "data=text", *PINNED)
    assert found.returncode == 0, found.output
    lr = suggested_lr(found)
    assert (lr_find_dir(found) / "lr_find.png").is_file()
    assert_no_training_left(found.cwd)
    steps = ("trainer.max_steps=300", "trainer.val_every=300", "trainer.val_at_start=false")
    losses = []
    for extra in ((), (f"optim.lr={lr}",)):
        trained = run_cli("train", "model=gpt", "data=text", *steps, *extra, *PINNED)
        assert trained.returncode == 0, trained.output
        losses.append(json.loads((trained.run_dirs()[-1] / "summary.json").read_text())["test"]["loss"])
    assert losses[1] <= losses[0], f"optim.lr={lr}: test loss {losses}"


@pytest.mark.integration
def test_several_devices_become_accumulation_in_one_process(run_cli):
    result = run_cli("lr-find", "trainer.devices=2", "trainer.grad_accum_steps=2", "lr_find.num_steps=20", *PINNED)
    assert result.returncode == 0, result.output
    assert "lr-find runs in one process" in result.stderr
    assert "x accumulation 4" in result.stderr
    assert not list((result.cwd / "outputs").rglob("train_rank*.log"))


# ------------------------------------------------------------------ bad input


BAD = [
    (["model=gpt", "data=digits"], "model=gpt cannot train on data=digits"),
    (["lr_find.min_lr=1e-2", "lr_find.max_lr=1e-2"], "lr_find.max_lr (0.01) must be above lr_find.min_lr"),
    (["lr_find.min_lr=1", "lr_find.max_lr=0.1"], "must be above lr_find.min_lr"),
    (["lr_find.min_lr=0"], "lr_find.min_lr must be > 0"),
    (["lr_find.min_lr=-1e-3"], "lr_find.min_lr must be > 0"),
    (["lr_find.num_steps=1"], "lr_find.num_steps must be between 2 and"),
    (["lr_find.num_step=50"], "did you mean lr_find.num_steps?"),
]


@pytest.mark.integration
@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_leaves_no_folder(run_cli, args, message):
    result = run_cli("lr-find", *args)
    assert result.returncode == 2, result.output
    assert outcome_lines(result.stderr) == [outcome_lines(result.stderr)[0]]
    assert message in outcome_lines(result.stderr)[0], result.stderr
    assert "Traceback" not in result.output
    assert not (result.cwd / "outputs").exists()  # the failed start's folder is gone


@pytest.mark.integration
def test_one_rank_of_many_refuses_with_one_line(run_cli):
    result = run_cli("lr-find", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert result.returncode == 2, result.output
    assert outcome_lines(result.stderr) == [outcome_lines(result.stderr)[0]]
    assert "lr-find runs in one process" in result.stderr and "Traceback" not in result.output
    assert not (result.cwd / "outputs").exists()


@pytest.mark.integration
def test_an_existing_run_dir_is_never_written_into(run_cli, tmp_path):
    taken = tmp_path / "outputs" / "2026-01-01" / "12-00-00-000000_train"
    taken.mkdir(parents=True)
    (taken / "config.yaml").write_text("mine: 1\n")
    result = run_cli("lr-find", f"hydra.run.dir={taken}")
    assert result.returncode == 2, result.output
    assert outcome_lines(result.stderr) == [outcome_lines(result.stderr)[0]]
    assert "already holds files" in result.stderr and "Traceback" not in result.output
    assert [p.name for p in taken.iterdir()] == ["config.yaml"]
    assert (taken / "config.yaml").read_text() == "mine: 1\n"


@pytest.mark.e2e
def test_help_describes_the_command_without_torch():
    probe = ("import sys\nfrom bigmodel_cli.cli import main\n"
             "code = main(['lr-find', '--help'])\n"
             "sys.exit(3 if 'torch' in sys.modules else code)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lr_find.num_steps=100" in proc.stdout and "optimizer steps from min_lr" in proc.stdout
    assert "trainer.max_steps=2000" in proc.stdout  # train's keys too
    listing = subprocess.run([sys.executable, "-m", "bigmodel_cli", "--help"], capture_output=True, text=True)
    assert re.search(r"^  lr-find ", listing.stdout, re.M)
