"""Checkpoints written by an earlier bigmodel still load, and give the very same numbers.

tests/fixtures/v1/ holds a tiny character-level GPT trained for 4 steps on tiny.txt by
the code of format "bigmodel-checkpoint/1", once as a plain file and once as a sharded
(FSDP, 2 ranks) folder:

    bigmodel train model=gpt data=text data.path=tiny.txt data.block_size=16 data.batch_size=4
        model.n_layer=1 model.n_head=2 model.n_embd=16 trainer.max_steps=4 trainer.val_every=4
        trainer.log_every=2 [trainer.devices=2 trainer.strategy=fsdp]

The expected metrics are what `bigmodel eval` printed for them when they were made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"
TRAIN_ARGS = ("model=gpt", "data=text", "data.path=tiny.txt", "data.block_size=16", "data.batch_size=4",
              "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "trainer.val_every=4",
              "trainer.log_every=2", "trainer.progress=plain")
EXPECTED = {  # (checkpoint, split): (loss, perplexity)
    ("gpt_tiny.pt", "val"): (2.87358, 17.7003),
    ("gpt_tiny.pt", "test"): (2.88086, 17.8296),
    ("gpt_tiny.dcp", "val"): (2.87006, 17.6381),
    ("gpt_tiny.dcp", "test"): (2.87799, 17.7784),
}


@pytest.fixture
def workdir(tmp_path) -> Path:
    """The fixtures copied into a fresh folder (the stored config names data.path=tiny.txt)."""
    for entry in FIXTURES.iterdir():
        (shutil.copytree if entry.is_dir() else shutil.copy)(entry, tmp_path / entry.name)
    return tmp_path


@pytest.mark.parametrize("ckpt, split", [("gpt_tiny.pt", "test"), ("gpt_tiny.dcp", "val")])
def test_an_old_checkpoint_evaluates_to_its_recorded_metrics(run_cli, workdir, ckpt, split):
    result = run_cli("eval", f"ckpt={ckpt}", f"split={split}", "hydra.run.dir=ev", cwd=workdir)
    assert result.returncode == 0, result.output
    report = json.loads((workdir / "ev" / "eval.json").read_text())
    assert report["step"] == 4
    loss, perplexity = EXPECTED[(ckpt, split)]
    assert report["metrics"]["loss"] == pytest.approx(loss, abs=1e-4)
    assert report["metrics"]["perplexity"] == pytest.approx(perplexity, abs=1e-3)


def test_an_old_checkpoint_generates_text(run_cli, workdir):
    result = run_cli("generate", "ckpt=gpt_tiny.pt", "prompt=the ", "max_new_tokens=20", "seed=3",
                     "hydra.run.dir=gen", cwd=workdir)
    assert result.returncode == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "rpipn nptn  ofhmx o"


@pytest.mark.parametrize("start", ["trainer.resume", "trainer.init_from"])
def test_an_old_checkpoint_starts_a_run(run_cli, workdir, start):
    result = run_cli("train", *TRAIN_ARGS, "trainer.max_steps=6", f"{start}=gpt_tiny.pt", "hydra.run.dir=run",
                     cwd=workdir)
    assert result.returncode == 0, result.output
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["steps"] == 6
    if start == "trainer.resume":
        assert summary["resumed_from"] == "gpt_tiny.pt"
        assert "resuming from gpt_tiny.pt at step 4 of 6" in result.output
        # Its text windows were drawn the old way: the resume says it is not bit for bit.
        assert "drawn by sampler version 1, this bigmodel's by version 2" in result.output
    else:
        assert "weights from gpt_tiny.pt" in result.output


def test_an_old_sharded_checkpoint_resumes_with_its_optimizer_state(run_cli, workdir):
    """Its optimizer state is nested (one param_groups list), as FSDP wrote it before pipeline
    parallelism keyed it per parameter: it still loads, in one process."""
    result = run_cli("train", *TRAIN_ARGS, "trainer.max_steps=6", "trainer.resume=gpt_tiny.dcp", "hydra.run.dir=run",
                     cwd=workdir)
    assert result.returncode == 0, result.output
    assert "resuming from gpt_tiny.dcp at step 4 of 6" in result.output
    assert json.loads((workdir / "run" / "summary.json").read_text())["steps"] == 6
