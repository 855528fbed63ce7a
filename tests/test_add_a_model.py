"""The "add a model" recipe (docs/contributing.md): a model of one's own that describes itself
(tests/helpers/toy_lm.py) trains split over two tensor-parallel ranks and cut into two
pipeline stages, exactly as in one process, is planned, and exports (its export evaluates as
its checkpoint does), with no line outside its file."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import bigmodel

pytestmark = [pytest.mark.dist, pytest.mark.xdist_group("add_a_model")]

HELPERS = Path(__file__).parent / "helpers"
TOY = ("model=custom", "model._target_=toy_lm.ToyLM", "+model.depth=2", "data=text", "data.block_size=16",
       "data.batch_size=8", "trainer.max_steps=8", "trainer.log_every=1", "trainer.val_every=8",
       "trainer.eval_batches=2", "trainer.progress=plain", "trainer.threads=1", "trainer.device=cpu")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's working directory with the model's file in it (toy_lm.py), as the recipe has
    it; the one-process run that both splits are compared with is trained there once."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copy(HELPERS / "toy_lm.py", folder)
    trained(folder, "one")
    return folder


def toy(folder: Path, *args):
    return bigmodel(*args, cwd=folder, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=400)


def trained(folder: Path, name, *args) -> Path:
    result = toy(folder, "train", *TOY, *args, f"hydra.run.dir={name}")
    assert result.returncode == 0, result.output
    return folder / name


def losses(run_dir: Path):
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_losses(got, expected):
    assert sorted(got) == sorted(expected) and len(got) == 8, (got, expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}: {got[step]} vs {expected[step]}"


def test_a_described_model_splits_over_two_tensor_parallel_ranks(project):
    split = trained(project, "tp", "trainer.devices=2", "trainer.parallel.tp=2")
    assert_same_losses(losses(split), losses(project / "one"))
    log = (split / "train_rank1.log").read_text()
    assert "sequence parallelism: the blocks' norms" in log  # its norms, by its own names
    refused = toy(project, "train", *TOY, "+model.heads=3", "trainer.devices=2", "trainer.parallel.tp=2")
    assert refused.returncode == 2 and "model.heads=3 attention heads do not split" in refused.stderr, refused.output


def test_a_described_model_runs_as_two_pipeline_stages(project):
    staged = trained(project, "pp", "trainer.devices=2", "trainer.parallel.pp=2")
    assert_same_losses(losses(staged), losses(project / "one"))
    assert "pipeline: 2 stages" in (staged / "train_rank1.log").read_text()
    planned = toy(project, "plan", *TOY, "trainer.devices=2", "trainer.parallel.pp=2")
    assert planned.returncode == 0, planned.output


def test_a_described_model_exports_and_its_export_evaluates_as_its_checkpoint(project):
    trust = "trusted_targets=[toy_lm.ToyLM]"  # the user's own class, named as the README says
    exported = toy(project, "export", "ckpt=one", "format=safetensors", "out=exported", trust)
    assert exported.returncode == 0, exported.output
    assert (project / "exported" / "model.safetensors").is_file()
    metrics = {}
    for source in ("one", "exported"):
        evaluated = toy(project, "eval", f"ckpt={source}", trust, "eval_batches=2", f"hydra.run.dir=eval_{source}")
        assert evaluated.returncode == 0, evaluated.output
        metrics[source] = json.loads((project / f"eval_{source}" / "eval.json").read_text())["metrics"]
    assert metrics["exported"] == pytest.approx(metrics["one"], rel=1e-6)
