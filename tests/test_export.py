"""bigmodel export: safetensors, TorchScript, ONNX and Hugging Face GPT-2 folders of trained
checkpoints give the source's metric and logits; bad input is one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigmodel_cli.errors import UserError

# Its module-scoped trained runs are made once: every test of the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("export")


TINY = ("trainer.progress=plain", "trainer.threads=1", "trainer.val_at_start=false", "logger=[]")
CORPUS = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


def train(compose, run_dir: Path, model: str, data: str, *overrides: str) -> Path:
    """A trained run dir (its checkpoints written at the end), built in-process."""
    from bigmodel_cli.build.training import build_run

    cfg = compose(f"model={model}", f"data={data}", *TINY, *overrides)
    run_dir.mkdir(parents=True)
    run = build_run(cfg, run_dir, {"model": model, "data": data})
    try:
        run.trainer.fit()
    finally:
        run.telemetry.close()
    return run_dir


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    from conftest import compose_config

    root = tmp_path_factory.mktemp("digits")
    return {name: train(compose_config, root / name, name, "digits", "trainer.max_steps=40", "trainer.val_every=40",
                        *extra)
            for name, extra in (("mlp", ("model.hidden_sizes=[32]",)), ("cnn", ("model.channels=[8,8]",)))}


@pytest.fixture(scope="module")
def char_gpt(tmp_path_factory):
    from conftest import compose_config

    root = tmp_path_factory.mktemp("gpt")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return train(compose_config, root / "run", "gpt", "text", f"data.path={corpus}", "data.block_size=16",
                 "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "trainer.max_steps=20",
                 "trainer.val_every=20")


def source_and_data(ckpt: Path):
    """The checkpoint's model (eval mode) and its own data, as `bigmodel eval` builds them."""
    from bigmodel_cli.build.parts import build_data
    from bigmodel_cli.build.inference import open_trained, ready_model

    trained = open_trained(str(ckpt), sections=("model", "data"))
    data = build_data(trained.config.data, trained.checkpoint.data)
    return ready_model(trained, torch.device("cpu")), data


@pytest.mark.unit
def test_metric(model, data) -> dict:
    from bigmodel_cli.engine.tasks import task_for
    from bigmodel_cli.engine.trainer import evaluate_model

    return evaluate_model(model, data, task_for(data.spec.task), "test", "fp32", torch.device("cpu"))


test_metric.__test__ = False  # a helper, not a test


class OnnxModule(torch.nn.Module):
    """An onnxruntime session as a module, so the engine's own evaluation runs it."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, x):
        return torch.from_numpy(self.session.run(["logits"], {"input": x.numpy()})[0])


def load_export(fmt: str, folder: Path) -> torch.nn.Module:
    if fmt == "torchscript":
        return torch.jit.load(str(folder / "model.torchscript"))
    if fmt == "onnx":
        return OnnxModule(folder / "model.onnx")
    meta = json.loads((folder / "bigmodel.json").read_text())["model"]  # the README's plain-module snippet
    from safetensors.torch import load_model

    from bigmodel_cli.dotted_path import import_object

    model = import_object(meta["class"])(**meta["kwargs"])
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_exports_evaluate_to_the_source_metric(digits_runs, tmp_path, name, fmt):
    from bigmodel_cli.export.export import export

    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install 'bigmodel[onnx]'")
        pytest.importorskip("onnxscript", reason="pip install 'bigmodel[onnx]'")
    out = tmp_path / "out"
    out.mkdir()
    result = export(str(digits_runs[name]), fmt, out)
    assert result["check"]["checked"] and result["check"]["max_abs_diff"] <= 1e-4
    model, data = source_and_data(digits_runs[name])
    source = test_metric(model, data)
    exported = test_metric(load_export(fmt, out), data)
    assert source["accuracy"] > 0.3  # trained: a metric worth comparing
    assert exported["accuracy"] == source["accuracy"]
    assert exported["loss"] == pytest.approx(source["loss"], abs=1e-5)
    assert not (out / ".export-partial").exists()


@pytest.mark.integration
def test_eval_reads_an_exported_folder(digits_runs, run_cli, tmp_path):
    exported = run_cli("export", f"ckpt={digits_runs['cnn']}", "format=safetensors", "out=cnn_export")
    assert exported.returncode == 0, exported.output
    folder = tmp_path / "cnn_export"
    assert {"model.safetensors", "bigmodel.json", "export.json"} <= {p.name for p in folder.iterdir()}
    from_export = run_cli("eval", f"ckpt={folder}")
    from_source = run_cli("eval", f"ckpt={digits_runs['cnn']}")
    assert from_export.returncode == 0 and from_source.returncode == 0, from_export.output + from_source.output
    metrics = [json.loads((r.run_dir("eval") / "eval.json").read_text())["metrics"]
               for r in (from_export, from_source)]  # (each its own eval dir under tmp_path)
    assert metrics[0] == metrics[1]


@pytest.mark.integration
def test_exported_char_gpt_loads_in_transformers_with_the_same_logits(char_gpt, tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install 'bigmodel[hf]'")
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.export.export import export

    out = tmp_path / "hf"
    out.mkdir()
    result = export(str(char_gpt), "hf", out)
    assert result["check"]["checked"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ours = ready_model(open_trained(str(char_gpt)), torch.device("cpu"))
    ids = torch.randint(0, ours.tok_emb.num_embeddings, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ours(ids), hf(ids).logits
    assert expected.abs().max() > 0.5  # trained logits, not zeros
    assert (got - expected).abs().max().item() < 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    vocab = json.loads((char_gpt / "vocab.json").read_text())
    text = "def add(a, b):\n    return a"
    assert tokenizer(text)["input_ids"] == [vocab.index(ch) for ch in text]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.unit
def test_a_model_without_a_gpt2_form_is_one_line(digits_runs, tmp_path):
    from bigmodel_cli.export.export import export

    with pytest.raises(UserError, match=r"format=hf cannot export .*models.mlp.MLP has no GPT-2 counterpart"):
        export(str(digits_runs["mlp"]), "hf", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_a_missing_extra_is_named(monkeypatch):
    import importlib.util

    from bigmodel_cli.export.export import format_named

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UserError, match=r"format=onnx needs onnxscript.*pip install 'bigmodel\[onnx\]'"):
        format_named("onnx")


@pytest.mark.integration
def test_bad_input_is_one_line_and_writes_nothing(digits_runs, run_cli, tmp_path):
    (tmp_path / "not_ours.pt").write_bytes(b"not a checkpoint")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = {("ckpt=not_ours.pt",): "not_ours.pt is corrupt or truncated",
             (f"ckpt={digits_runs['mlp']}", "format=tflite"): "format",
             (f"ckpt={digits_runs['mlp']}", f"out={taken}"): "already holds files"}
    for args, message in cases.items():
        result = run_cli("export", *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.output
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


@pytest.mark.unit
def test_a_damaged_or_edited_export_is_refused(digits_runs, tmp_path):
    from bigmodel_cli.engine.find_checkpoint import Pick, find_checkpoint
    from bigmodel_cli.build.inference import open_trained
    from bigmodel_cli.export.export import export

    export(str(digits_runs["mlp"]), "safetensors", tmp_path)
    with pytest.raises(UserError, match="cannot be continued; start from its weights with trainer.init_from"):
        find_checkpoint(tmp_path, Pick.NEWEST_VALID, setting="trainer.resume")
    record = json.loads((tmp_path / "bigmodel.json").read_text())
    record["config"]["model"]["_target_"] = "os.system"
    (tmp_path / "bigmodel.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="refused to follow model._target_=os.system"):
        open_trained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="model.safetensors is damaged or truncated"):
        find_checkpoint(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("bias", [True, False])
def test_the_gpt2_mapping_computes_the_same_function_for_any_weights(bias):
    """Large random weights make every difference in architecture show (gelu against
    gelu_new, a missed transpose, a bias left out), which a briefly trained GPT would hide."""
    transformers = pytest.importorskip("transformers", reason="pip install 'bigmodel[hf]'")
    from bigmodel_cli.models.gpt import GPT

    torch.manual_seed(0)
    ours = GPT(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=bias).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, 0.5)
    config, weights = ours.as_gpt2()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert missing in ([], ["lm_head.weight"]) and unexpected == []
    hf.tie_weights()
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(ids), hf(ids).logits
    assert expected.abs().max() > 1
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


@pytest.mark.unit
def test_an_int8_checkpoint_is_refused_in_one_line_where_the_format_cannot_hold_it(digits_runs, tmp_path):
    """A `bigmodel compress method=quantize` checkpoint: safetensors would rebuild the fp32
    class (which crashed on the int8 weights); TorchScript traces the int8 kernels."""
    from bigmodel_cli.compress.pipeline import compress_checkpoint
    from bigmodel_cli.export.export import export
    from conftest import compose_config

    quantized = tmp_path / "int8"
    quantized.mkdir()
    compress_checkpoint(compose_config(f"ckpt={digits_runs['mlp']}", "method=quantize", "latency_repeats=1",
                                       "latency_warmup=0", config_name="compress"), quantized)
    with pytest.raises(UserError, match=r"format=safetensors cannot export .*int8-quantized \(dynamic\).*"
                                        r"export the fp32 checkpoint it was compressed from, or use format=torchscript"):
        export(str(quantized), "safetensors", tmp_path / "st")
    assert not (tmp_path / "st").exists()
    assert export(str(quantized), "torchscript", tmp_path / "ts")["check"]["checked"]


@pytest.mark.unit
def test_an_exporter_failure_is_one_line_naming_the_format(digits_runs, tmp_path, monkeypatch):
    from bigmodel_cli.export.export import export
    from bigmodel_cli.export.torchscript_format import TorchScript

    def unsupported(*args):
        raise RuntimeError("Could not export operator aten::weird\nlong details")

    monkeypatch.setattr(TorchScript, "write", unsupported)
    with pytest.raises(UserError, match=r"format=torchscript cannot export .*\(RuntimeError: Could not export "
                                        r"operator aten::weird\); use another format$"):
        export(str(digits_runs["mlp"]), "torchscript", tmp_path / "out")
    assert not (tmp_path / "out" / ".export-partial").exists()


@pytest.mark.unit
def test_an_export_whose_weights_are_integers_is_refused(digits_runs, tmp_path):
    """load_state_dict would cast int64 weights into the float layers and evaluate garbage."""
    from safetensors.torch import load_file, save_file

    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.export.export import export

    export(str(digits_runs["mlp"]), "safetensors", tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({name: t.round().to(torch.int64) for name, t in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"does not fit this model: .*weight holds torch.int64 in the checkpoint "
                                        r"but torch.float32 here"):
        ready_model(open_trained(str(tmp_path)), torch.device("cpu"))
