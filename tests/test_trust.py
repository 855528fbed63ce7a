"""A checkpoint from someone else never runs code (issue 11, section 1).

Three kinds of crafted checkpoint, each on every path that reads one (eval, generate,
trainer.resume=<path>, trainer.resume=auto, trainer.init_from):
- a sharded (DCP) folder whose `.metadata` index is a pickle that runs code and then
  returns the genuine index (plain `pickle.load` would run it silently);
- a sharded folder with an item that `torch.load(weights_only=False)` would run;
- a checkpoint whose stored config names another importable callable as `_target_`.
Every payload only creates a marker file; the marker must never appear. Each crafted folder
carries digests that match its files, as a competent attacker's would, so what stops it
is the restricted reading, not the integrity check.
"""

import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bigmodel_cli.commands.train import train
from bigmodel_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from conftest import compose_config
from crafting import RunsCode, as_sharded, evil_index, touch

# Its module-scoped trained runs are made once: every test of the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("trust")


HELPERS = Path(__file__).parent / "helpers"
MLP = ("model.hidden_sizes=[16]", "trainer.val_every=2", "trainer.log_every=1", "trainer.progress=plain")
CORPUS = "To be, or not to be, that is the question.\n" * 200
GPT = ("model=gpt", "data=text", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data.block_size=16",
       "trainer.val_every=2", "trainer.eval_batches=2", "trainer.progress=plain")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained classifier and a trained character LM (single process, a few steps)."""
    base = tmp_path_factory.mktemp("runs")
    (base / "corpus.txt").write_text(CORPUS)
    train(compose_config(*MLP, "trainer.max_steps=4"), base / "mlp")
    train(compose_config(*GPT, f"data.path={base / 'corpus.txt'}", "trainer.max_steps=4"), base / "gpt")
    return base


@pytest.mark.integration
def test_the_crafted_index_runs_code_under_plain_pickle(runs, tmp_path):
    """The payload is real: DCP's own reader (pickle.load) would run it."""
    marker = tmp_path / "ran"
    folder = evil_index(as_sharded(runs / "mlp" / "checkpoints" / "last.pt", tmp_path / "x.dcp"), marker)
    code = f"import pickle; pickle.load(open({str(folder / '.metadata')!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert marker.exists()


def crafted(kind: str, runs: Path, tmp_path: Path, marker: Path, lm: bool = False) -> Path:
    source = runs / ("gpt" if lm else "mlp") / "checkpoints" / "last.pt"
    if kind == "index":
        return evil_index(as_sharded(source, tmp_path / "evil.dcp"), marker)
    if kind == "item":
        return as_sharded(source, tmp_path / "evil.dcp", item_payload=RunsCode(touch(marker), torch.zeros(1)))
    state = load_checkpoint(source).to_state()
    # Another importable callable where the model class belongs: instantiate would call it.
    state["config"]["model"] = {"_target_": "os.mkdir", "path": str(marker)}
    save_checkpoint(state, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


KINDS = ["index", "item", "target"]


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_eval_runs_no_code_from_a_checkpoint(run_cli, runs, tmp_path, kind):
    marker = tmp_path / "ran"
    evil = crafted(kind, runs, tmp_path, marker)
    result = run_cli("eval", f"ckpt={evil}")
    assert result.returncode == 2, result.output
    assert not marker.exists()
    assert_one_refusal(result.stderr, kind)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_generate_runs_no_code_from_a_checkpoint(run_cli, runs, tmp_path, kind):
    marker = tmp_path / "ran"
    evil = crafted(kind, runs, tmp_path, marker, lm=True)
    result = run_cli("generate", f"ckpt={evil}", "max_new_tokens=5")
    assert result.returncode == 2, result.output
    assert not marker.exists()
    assert_one_refusal(result.stderr, kind)


def assert_one_refusal(stderr: str, kind: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refused"), stderr
    assert "Traceback" not in stderr
    expected = {"index": "builtins.eval", "item": "GLOBAL eval", "target": "model._target_=os.mkdir"}[kind]
    assert expected in lines[0]
    if kind == "target":
        assert "trusted_targets=[os.mkdir]" in lines[0]


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start", ["resume", "init_from"])
def test_resume_and_init_from_run_no_code_from_a_checkpoint(run_cli, runs, tmp_path, kind, start):
    marker = tmp_path / "ran"
    evil = crafted(kind, runs, tmp_path, marker)
    result = run_cli("train", *MLP, "trainer.max_steps=6", f"trainer.{start}={evil}", "hydra.run.dir=run")
    assert not marker.exists()
    assert "Traceback" not in result.output
    if kind == "target" and start == "init_from":  # weights only: the run's own config builds the model
        assert result.returncode == 0, result.output
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.output
    # A stored _target_ is never imported here: resume refuses a config unlike the run's own.
    assert ("cannot resume" if kind == "target" else "refused to load") in errors[0]


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_resume_auto_skips_a_crafted_newest_checkpoint(run_cli, runs, tmp_path, kind):
    """Planted as the newest checkpoint of a run dir, it is skipped (or, for a stored
    config, refused) and never run."""
    import shutil

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    shutil.copytree(runs / "mlp", run)
    evil = crafted(kind, runs, tmp_path, marker)
    planted = run / "checkpoints" / ("step_00000099.dcp" if evil.is_dir() else "step_00000099.pt")
    shutil.move(str(evil), planted)
    result = run_cli("train", *MLP, "trainer.max_steps=6", f"hydra.run.dir={run}")
    assert not marker.exists()
    if kind == "target":  # its config differs from this run's: nothing can continue from it
        assert result.returncode == 2 and "cannot resume" in result.stderr, result.output
    else:
        assert result.returncode == 0, result.output
        assert "skipping damaged checkpoint step_00000099.dcp" in result.output
        assert "resuming from" in result.output and "step_00000004.pt" in result.output


@pytest.mark.integration
def test_a_nested_stored_target_is_refused_too(run_cli, runs, tmp_path):
    marker = tmp_path / "ran"
    state = load_checkpoint(runs / "mlp" / "checkpoints" / "last.pt").to_state()
    state["config"]["data"]["extra"] = {"_target_": "os.mkdir", "_args_": [str(marker)]}
    save_checkpoint(state, tmp_path / "evil.pt")
    result = run_cli("eval", f"ckpt={tmp_path / 'evil.pt'}")
    assert result.returncode == 2 and "refused to follow data.extra._target_=os.mkdir" in result.stderr
    assert not marker.exists()


@pytest.mark.integration
@pytest.mark.parametrize("key", ["model.hidden_sizes", "data.seed"])
def test_an_interpolation_in_a_rebuilt_section_is_refused(run_cli, runs, tmp_path, key):
    """Hydra's instantiate resolves a node before building it: `${oc.create:...}` would make a
    `_target_` that no check has seen."""
    marker = tmp_path / "ran"
    state = load_checkpoint(runs / "mlp" / "checkpoints" / "last.pt").to_state()
    section, name = key.split(".")
    state["config"][section][name] = f"${{oc.create:{{_target_: os.mkdir, path: {marker}}}}}"
    save_checkpoint(state, tmp_path / "evil.pt")
    result = run_cli("eval", f"ckpt={tmp_path / 'evil.pt'}")
    assert result.returncode == 2 and f"{key} holds an interpolation" in result.stderr, result.output
    assert not marker.exists()


@pytest.mark.unit
def test_stored_interpolations_elsewhere_stay_text(runs, tmp_path, monkeypatch):
    from bigmodel_cli.trust import vetted_config

    monkeypatch.setenv("BIGMODEL_SECRET", "leaked")
    state = load_checkpoint(runs / "mlp" / "checkpoints" / "last.pt").to_state()
    state["config"]["trainer"]["note"] = "${oc.env:BIGMODEL_SECRET} and \\${x}"
    config = vetted_config(state["config"], tmp_path)
    assert config.trainer.note == "${oc.env:BIGMODEL_SECRET} and \\${x}"
    assert OmegaConf.to_container(config, resolve=True)["trainer"]["note"] == config.trainer.note


@pytest.mark.integration
def test_trusted_targets_lets_a_custom_model_be_evaluated(run_cli, tmp_path):
    shutil.copy(HELPERS / "flaky_model.py", tmp_path)  # the user's model, in their working directory
    trained = run_cli("train", "model=custom", "model._target_=flaky_model.NonFiniteAt", "+model.at=100000",
                      "trainer.max_steps=3", "trainer.val_every=3", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    refused = run_cli("eval", "ckpt=run")
    assert refused.returncode == 2 and "trusted_targets=[flaky_model.NonFiniteAt]" in refused.stderr
    allowed = run_cli("eval", "ckpt=run", "trusted_targets=[flaky_model.NonFiniteAt]")
    assert allowed.returncode == 0, allowed.output
    assert "accuracy" in allowed.stdout


@pytest.mark.unit
def test_a_crafted_index_cannot_point_outside_its_folder(runs, tmp_path):
    from bigmodel_cli.engine.sharded import read_index
    from bigmodel_cli.errors import UserError

    folder = as_sharded(runs / "mlp" / "checkpoints" / "last.pt", tmp_path / "x.dcp")
    index = pickle.loads((folder / ".metadata").read_bytes())
    for info in index.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(UserError, match="names a file outside its folder"):
        read_index(folder)


@pytest.mark.integration
def test_a_genuine_sharded_checkpoint_still_loads(runs, tmp_path):
    """The restricted reading admits what DCP itself writes (eval and a resume from it)."""
    from bigmodel_cli.engine.sharded import read_index

    folder = as_sharded(runs / "mlp" / "checkpoints" / "last.pt", tmp_path / "good.dcp")
    assert load_checkpoint(folder).is_sharded  # checked: index, items and digests (check_folder)
    assert read_index(folder).state_dict_metadata
    out = train(compose_config(*MLP, "trainer.max_steps=6", f"trainer.resume={folder}"), tmp_path / "resumed")
    assert out["steps"] == 6 and out["resumed_from"] == str(folder)


@pytest.mark.parametrize("stream,reason", [
    # BUILD applied to an allowed class itself would rewrite its attributes for the process.
    (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n}X\x03\x00\x00\x00fooK\x01sb.", "BUILD on a type"),
    # ... or on a shared object, an enum member, whose change would outlive the load.
    (b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00\x85R}X\x06\x00\x00\x00_name_X"
     b"\x05\x00\x00\x00PWNEDsb.", "BUILD on a _MEM_FORMAT_ENCODING"),
    (b"\x80\x02\x82\xf0.", "extension codes"),  # copyreg's registry: objects not looked up by name
    (b"\x80\x02cposix\nsystem\n.", "posix.system"),
    (b"\x80\x04\x95\x17\x00\x00\x00\x00\x00\x00\x00\x8c\x05torch\x8c\x0cSize.__new__\x93.", "torch.Size.__new__"),
])
@pytest.mark.unit
def test_the_index_unpickler_admits_nothing_but_dcp_metadata(stream, reason):
    from bigmodel_cli.engine.sharded import _IndexUnpickler

    with pytest.raises(pickle.UnpicklingError, match=reason.replace(".", r"\.")):
        _IndexUnpickler(io.BytesIO(stream)).load()
