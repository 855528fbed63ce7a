"""The foundation's accuracy targets with default settings (the accuracy tier; .ci/run runs them).

Each runs the real `bigmodel train` on CPU with the shipped defaults only. How long they
take is the machine's business, not a test's: bench/acceptance_times.py measures it (see
bench/RESULTS.md); the timeouts here only stop a hung run, with a wide margin.
"""

import json
import math

import pytest



@pytest.mark.parametrize("args,target", [
    ((), 0.95),  # the README's first command: MLP on digits
    (("model=cnn",), 0.97),
    (("model=rnn",), 0.90),
    (("model=transformer", "optim=adam"), 0.90),
], ids=["mlp", "cnn", "rnn", "transformer-adam"])
@pytest.mark.accuracy
def test_digits_accuracy(run_cli, args, target):
    result = run_cli("train", *args, "trainer.progress=plain", timeout=3000)
    assert result.returncode == 0, result.output
    accuracy = result.summary()["test"]["accuracy"]
    assert accuracy >= target, f"test accuracy {accuracy:.4f} < {target}"


@pytest.mark.accuracy
def test_gpt_char_level_text_below_two_nats(run_cli):
    result = run_cli("train", "model=gpt", "data=text", "trainer.progress=plain", timeout=3000)
    assert result.returncode == 0, result.output
    summary = result.summary()
    vocab = len(json.loads((result.run_dir() / "vocab.json").read_text()))
    records = [json.loads(l) for l in (result.run_dir() / "metrics.jsonl").read_text().splitlines()]
    start = next(r["val/loss"] for r in records if r["step"] == 0 and "val/loss" in r)
    assert abs(start - math.log(vocab)) < 0.5  # starts at about ln(vocab)
    assert summary["best_value"] < 2.0


@pytest.mark.dist
def test_two_gloo_ranks_match_one_process(run_cli, tmp_path):
    """Issue 3, acceptance 1: trainer.devices=2 for 50 steps is within 1 point of one
    process with twice the per-device batch."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_cli("train", "trainer.max_steps=50", "data.batch_size=128", "trainer.device=cpu", cwd=tmp_path / "one",
                  timeout=1200)
    two = run_cli("train", "trainer.max_steps=50", "trainer.devices=2", "trainer.device=cpu", cwd=tmp_path / "two",
                  timeout=1200)
    assert one.returncode == 0 and two.returncode == 0, one.output + two.output
    assert len(two.run_dirs()) == 1
    assert abs(one.summary()["test"]["accuracy"] - two.summary()["test"]["accuracy"]) <= 0.01
