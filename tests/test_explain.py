"""bigmodel explain: attribution maps of a trained checkpoint, and the checks that say how
far to trust them (issue 18's acceptance)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("captum", reason="pip install 'bigmodel[explain]'")

from conftest import CLIResult, bigmodel  # noqa: E402  (after the skip: captum is optional)

# Its module-scoped trained runs are made once: every test of the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("explain")


HELPERS = Path(__file__).resolve().parent / "helpers"
QUIET = ("trainer.progress=plain", "trainer.threads=1")
CORPUS = "the cat sat on the mat. the dog sat on the log. a cat and a dog.\n" * 200


def cli(cwd: Path, *args: str, env: dict | None = None) -> CLIResult:
    return bigmodel(*args, cwd=cwd, env=env, timeout=600)


def trained(cwd: Path, *args: str, env: dict | None = None) -> Path:
    result = cli(cwd, "train", *args, *QUIET, "hydra.run.dir=run", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd / "run"


def explained(cwd: Path, ckpt: Path, *args: str, env: dict | None = None) -> Path:
    result = cli(cwd, "explain", f"ckpt={ckpt}", *args, "hydra.run.dir=explained", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (cwd / "explained" / "stdout.txt").write_text(result.stdout)
    return cwd / "explained"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    """A CNN trained on the digits for 300 steps (about 99% test accuracy)."""
    return trained(tmp_path_factory.mktemp("cnn"), "model=cnn", "data=digits", "trainer.max_steps=300",
                   "trainer.val_every=300")


@pytest.fixture(scope="module")
def cnn_explained(cnn, tmp_path_factory) -> Path:
    """IG, LIME and kernel SHAP on its first 16 test digits, with the randomisation check."""
    return explained(tmp_path_factory.mktemp("cnn_explained"), cnn, "methods=[ig,lime,kernel_shap]",
                     "num_examples=16")


def score_drop(model, inputs, blank, targets, pixels) -> float:
    """How much blanking `pixels` (N, k indices into the 8x8 image) lowers the targets' logits, on average."""
    import torch

    x, t, index = torch.tensor(inputs), torch.tensor(targets)[:, None], torch.tensor(pixels)
    cut = x.reshape(len(x), -1).clone().scatter_(1, index, float(blank.min())).reshape(x.shape)
    with torch.no_grad():
        return float((model(x).gather(1, t) - model(cut).gather(1, t)).mean())


@pytest.mark.accuracy
def test_the_maps_lie_on_the_strokes_and_add_up(cnn, cnn_explained):
    grid = cnn_explained / "ig_grid.png"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and grid.stat().st_size > 20_000
    assert (cnn_explained / "ig_class_means.png").is_file()
    arrays = np.load(cnn_explained / "attributions.npz", allow_pickle=False)
    inputs, blank = arrays["inputs"], arrays["baseline"]
    assert inputs.shape == (16, 1, 8, 8)
    ink = (inputs != blank).reshape(16, 64)  # the drawn strokes: where the digit is not blank paper
    positive = np.clip(arrays["ig_features"], 0, None)
    share_on_ink = (positive * ink).sum() / positive.sum()
    assert share_on_ink > ink.mean() + 0.3, (share_on_ink, ink.mean())
    # ...and on the strokes that matter: blanking the 4 pixels with the largest attribution lowers
    # the explained logit far more than blanking 4 stroke pixels at random (a mirrored map fails this).
    import torch

    from bigmodel_cli.build.inference import open_trained, ready_model

    model = ready_model(open_trained(str(cnn)), torch.device("cpu"))
    rng = np.random.default_rng(0)
    at_random = np.stack([rng.permutation(np.flatnonzero(row))[:4] for row in ink])
    top = np.argsort(-arrays["ig_features"], axis=1)[:, :4]
    drops = [score_drop(model, inputs, blank, arrays["targets"], pixels) for pixels in (top, at_random)]
    assert drops[0] > 2 * drops[1], drops
    summary = json.loads((cnn_explained / "explain.json").read_text())
    assert summary["examples"]["count"] == 16 and len(summary["predictions"]) == 16
    completeness = summary["completeness"]
    assert len(completeness["relative_error"]) == 16 and completeness["mean_relative_error"] < 0.05
    # Its own check agrees: the strokes hold most of the positive attribution.
    assert summary["on_input"]["ig"]["positive_share"] == pytest.approx(share_on_ink, rel=1e-4)
    report = (cnn_explained / "report.md").read_text()
    assert "## Completeness" in report and f"{completeness['mean_relative_error']:.2%}" in report


@pytest.mark.accuracy
def test_lime_and_kernel_shap_agree_with_integrated_gradients(cnn_explained):
    summary = json.loads((cnn_explained / "explain.json").read_text())
    agreement = summary["agreement"]
    assert set(agreement) == {"ig~lime", "ig~kernel_shap", "lime~kernel_shap"}
    assert agreement["ig~lime"] > 0.4 and agreement["ig~kernel_shap"] > 0.4, agreement
    report = (cnn_explained / "report.md").read_text()
    assert f"| ig vs lime | {agreement['ig~lime']:.3f} |" in report
    assert f"agreement ig vs kernel_shap: rank correlation {agreement['ig~kernel_shap']:.3f}" in (
        cnn_explained / "stdout.txt").read_text()
    for name in ("lime", "kernel_shap"):
        assert (cnn_explained / f"{name}_grid.png").is_file()
        # A linear model per superpixel: the 2x2 patches of a digit share one value.
        first = np.load(cnn_explained / "attributions.npz")[f"{name}_features"][0].reshape(8, 8)
        assert np.allclose(first[0::2, 0::2], first[1::2, 1::2])


@pytest.mark.accuracy
def test_randomising_the_weights_changes_the_maps(cnn_explained):
    summary = json.loads((cnn_explained / "explain.json").read_text())
    randomised = summary["randomisation"]
    agreement = summary["agreement"]["ig~lime"]
    for name in ("ig", "lime"):
        assert randomised["methods"][name]["correlation"] < agreement - 0.2, (randomised, agreement)
    assert randomised["passed"] is True
    report = (cnn_explained / "report.md").read_text()
    assert "**PASSED**" in report and "re-initialised" in report


@pytest.mark.integration
def test_a_gpt_prompt_gets_per_token_attributions(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    run = trained(tmp_path, "model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data=text",
                  "data.path=corpus.txt", "data.block_size=16", "trainer.max_steps=150", "trainer.val_every=150")
    prompt = "the dog sat on the "
    out = explained(tmp_path, run, f"prompt='{prompt}'", "methods=[ig,occlusion]",
                    env={"FORCE_COLOR": "1", "COLORTERM": "truecolor", "COLUMNS": "200"})
    console = (out / "stdout.txt").read_text()
    assert "48;2;" in console  # the tokens printed on coloured backgrounds (rich's true-colour codes)
    assert "explaining" in console
    summary = json.loads((out / "explain.json").read_text())
    tokens = summary["predictions"][0]["tokens"]
    assert "".join(tokens) == prompt[-16:]  # its last block_size characters
    features = np.load(out / "attributions.npz")["ig_features"]
    assert features.shape == (1, 16) and np.abs(features).sum() > 0
    assert summary["completeness"]["max_relative_error"] < 0.05
    page = (out / "attributions.html").read_text()
    assert page.count("<span title=") == 2 * 16 and "background:rgb" in page
    assert (out / "ig_tokens.png").is_file()


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("tiny"), "model=cnn", "data=digits", "trainer.max_steps=2")


@pytest.mark.parametrize("args, says", [
    (("method=shapley",), "expected one of [ig, saliency, occlusion, lime, kernel_shap, gradient_shap]"),
    (("methods=[ig,gradcam]",), "gradcam"),
    (("prompt=hello",), "prompt= is for language models"),
    (("num_examples=100000",), "num_examples=100000 is more than the test split's"),
    (("target=cat",), "target=cat is neither predicted, true nor an output index"),
])
@pytest.mark.integration
def test_bad_input_is_one_line(tiny_cnn, tmp_path, args, says):
    result = cli(tmp_path, "explain", f"ckpt={tiny_cnn}", *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_missing_captum_says_how_to_install_it(tiny_cnn, tmp_path):
    fake = tmp_path / "no_captum" / "captum"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named captum')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    result = cli(tmp_path, "explain", f"ckpt={tiny_cnn}", env=env)
    assert result.returncode == 2 and "pip install 'bigmodel[explain]'" in result.stderr, result.stderr


@pytest.mark.integration
def test_a_model_without_a_token_embedding_is_explained_by_perturbation(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    shutil.copy(HELPERS / "onehot_lm.py", tmp_path)  # the user's model, in their working directory
    run = trained(tmp_path, "model=custom", "model._target_=onehot_lm.OneHotLM", "data=text", "data.path=corpus.txt",
                  "data.block_size=8", "trainer.max_steps=2", "trainer.val_every=2")
    trust = "trusted_targets=[onehot_lm.OneHotLM]"
    refused = cli(tmp_path, "explain", f"ckpt={run}", trust, "method=ig")
    assert refused.returncode == 2, refused.stderr
    assert "method=ig cannot explain model=custom" in refused.stderr and "method=occlusion" in refused.stderr
    out = explained(tmp_path, run, trust, "method=occlusion", "num_examples=2", "sanity_check=false")
    features = np.load(out / "attributions.npz")["occlusion_features"]
    # The model reads only each position's own token: the last one decides the next token alone.
    assert features.shape == (2, 8) and np.all(features[:, :-1] == 0) and np.all(features[:, -1] != 0)


@pytest.mark.e2e
def test_help_answers_without_torch_and_describes_each_key():
    import dataclasses

    from bigmodel_cli.commands.explain import ExplainConfig
    from bigmodel_cli.help import describe_key

    probe = ("import sys\nfrom bigmodel_cli.cli import main\ncode = main(['explain', '--help'])\n"
             "sys.exit(3 if 'torch' in sys.modules else code)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "methods=[]" in proc.stdout and "kernel_shap" in proc.stdout
    missing = [f.name for f in dataclasses.fields(ExplainConfig) if not describe_key(ExplainConfig, f.name)]
    assert not missing, f"add a comment to ExplainConfig: {missing}"


@pytest.mark.unit
def test_rank_correlations_treat_a_flat_map_as_sharing_no_ranking():
    from bigmodel_cli.explain.checks import rank_correlations

    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = np.array([[2.0, 4.0, 6.0, 8.0], [0.0, 0.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    compared = np.ones_like(a, dtype=bool)
    assert rank_correlations(a, b, compared) == pytest.approx([1.0, 0.0, -1.0])
    compared[0, :2] = False  # fewer than 3 compared groups: no number
    assert np.isnan(rank_correlations(a, b, compared)[0])


@pytest.mark.unit
def test_target_true_survives_hydra_reading_it_as_a_boolean():
    from bigmodel_cli.errors import UserError
    from bigmodel_cli.explain.examples import parse_target

    assert [parse_target(v) for v in ("True", "true", "predicted", "3")] == ["true", "true", "predicted", 3]
    with pytest.raises(UserError, match="target=cat is neither"):
        parse_target("cat")
