"""bigmodel compress (issue 17): pruning and int8 quantization of trained checkpoints, with
before/after numbers, a compressed checkpoint that the inference loader reads back, and
one-line refusals of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bigmodel_cli.commands.train import train
from bigmodel_cli.compress.pipeline import compress_checkpoint
from conftest import compose_config, outcome_lines

# Its module-scoped trained runs are made once: every test of the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("compress")


QUICK = ("trainer.progress=plain", "trainer.threads=1", "trainer.log_every=100")
MLP = ("trainer.max_steps=300", "trainer.val_every=300", *QUICK)
LSTM = ("model=rnn", "model.cell=lstm", "optim=adam", "trainer.max_steps=300", "trainer.val_every=300", *QUICK)
GPT = ("model=gpt", "data=text", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "data.block_size=32",
       "data.batch_size=16", "trainer.max_steps=150", "trainer.val_every=150", *QUICK)
CNN = ("model=cnn", "model.channels=[8,16]", "model.hidden_size=32", "trainer.max_steps=60",
       "trainer.val_every=60", *QUICK)
# few timed batches: the tests check that latency is reported, never how fast anything is
FAST_MEASURE = ("latency_repeats=3", "latency_warmup=1")


def trained(tmp_path_factory, name, overrides) -> Path:
    run = tmp_path_factory.mktemp(name) / "run"
    train(compose_config(*overrides), run)
    return run


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return trained(tmp_path_factory, "mlp", MLP)


@pytest.fixture(scope="module")
def lstm(tmp_path_factory):
    return trained(tmp_path_factory, "lstm", LSTM)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return trained(tmp_path_factory, "gpt", GPT)


def compress(ckpt: Path, out: Path, *overrides: str) -> dict:
    out.mkdir()
    cfg = compose_config(f"ckpt={ckpt}", *FAST_MEASURE, *overrides, config_name="compress")
    return compress_checkpoint(cfg, out)


def digest(run: Path) -> str:
    return hashlib.sha256((run / "checkpoints" / "best.pt").read_bytes()).hexdigest()


def reloaded_metrics(out: Path, split: str = "test") -> dict:
    """The compressed run dir's checkpoint evaluated as `bigmodel eval ckpt=<run dir>` does."""
    from bigmodel_cli.compress.pipeline import checkpoint_data
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.engine.tasks import task_for
    from bigmodel_cli.engine.trainer import evaluate_model

    model_run = open_trained(str(out))
    data = checkpoint_data(model_run)
    model = ready_model(model_run, torch.device("cpu"), data.spec)
    return evaluate_model(model, data, task_for(data.spec.task), split, "fp32", torch.device("cpu"))


@pytest.mark.integration
def test_unstructured_pruning_with_a_finetune_keeps_accuracy(mlp, tmp_path):
    source = digest(mlp)
    out = tmp_path / "pruned"
    summary = compress(mlp, out, "method=prune", "prune.amount=0.5", "prune.finetune_steps=100")
    before, after = summary["before"], summary["after"]
    assert abs(after["metrics"]["accuracy"] - before["metrics"]["accuracy"]) <= 0.02
    assert before["sparsity"] == 0 and 0.45 < after["sparsity"] < 0.51  # the biases are not pruned
    assert all(layer["sparsity"] > 0.2 for layer in after["layers"])
    assert after["parameters"] == before["parameters"]
    weights = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    matrices = [w for name, w in weights.items() if name.endswith("weight")]
    assert sum(int((w == 0).sum()) for w in matrices) / sum(w.numel() for w in matrices) == pytest.approx(0.5, abs=0.01)
    assert (out / "finetune" / "metrics.jsonl").is_file()
    assert reloaded_metrics(out)["accuracy"] == pytest.approx(after["metrics"]["accuracy"])
    assert digest(mlp) == source  # the input checkpoint is only read


@pytest.mark.integration
def test_structured_pruning_shrinks_the_mlp(mlp, tmp_path):
    out = tmp_path / "structured"
    summary = compress(mlp, out, "method=prune", "prune.amount=0.3", "prune.structured=true")
    stored = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert stored["config"]["model"]["hidden_sizes"] == [179, 90]  # 256 and 128 less 30%
    assert stored["model"]["net.1.weight"].shape == (179, 64)
    assert stored["model"]["net.4.weight"].shape == (90, 179)
    before, after = summary["before"], summary["after"]
    assert after["parameters"] == 64 * 179 + 179 + 179 * 90 + 90 + 90 * 10 + 10 < before["parameters"]
    assert after["weights_bytes"] < before["weights_bytes"]
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0
    report = (out / "report.md").read_text()
    for row in ("| parameters | 50,826 |", "CPU latency per batch", "| test/accuracy |", "| `net.1` | Linear |"):
        assert row in report
    assert reloaded_metrics(out)["accuracy"] == pytest.approx(after["metrics"]["accuracy"])


def zero_units(weight_in: torch.Tensor, weight_out: torch.Tensor, units: list, block: int = 1) -> None:
    """Silence hidden units: nothing goes in, nothing comes out."""
    weight_in[units] = 0
    for unit in units:
        weight_out[:, unit * block:(unit + 1) * block] = 0


@pytest.mark.unit
@torch.no_grad()
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_structured_pruning_removes_silent_units_without_changing_the_outputs(kind):
    """Units that contribute nothing are the ones removed, and the smaller model, rebuilt
    from the smaller config, computes what the large one did: the rewiring is exact."""
    from bigmodel_cli.compress.structured import shrink
    from bigmodel_cli.models.cnn import CNN
    from bigmodel_cli.models.mlp import MLP

    torch.manual_seed(0)
    if kind == "mlp":
        model, x = MLP((64,), 10, hidden_sizes=(10, 20)), torch.randn(5, 64)
        for first, second, units in ((1, 3, [1, 4, 7]), (3, 5, [0, 2, 5, 11, 13, 19])):
            zero_units(model.net[first].weight, model.net[second].weight, units)
            model.net[first].bias[units] = 0
    else:
        model, x = CNN((1, 8, 8), 10, channels=(10,), hidden_size=10), torch.randn(5, 1, 8, 8)
        model.features[1].bias.data[[0, 5, 9]] = -5.0  # batch norm's shift: ReLU silences them
        zero_units(model.features[0].weight, model.head[1].weight, [0, 5, 9], block=16)
        zero_units(model.head[1].weight, model.head[4].weight, [2, 3, 8])
    model.eval()
    state, sizes = shrink(model, kind, 0.3)
    small = MLP((64,), 10, **sizes) if kind == "mlp" else CNN((1, 8, 8), 10, **sizes)
    small.load_state_dict(state)
    small.eval()
    assert sizes == ({"hidden_sizes": [7, 14]} if kind == "mlp" else {"channels": [7], "hidden_size": 7})
    torch.testing.assert_close(small(x), model(x))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_int8_quantization_shrinks_the_weights_and_keeps_accuracy(name, mlp, lstm, tmp_path):
    run = {"mlp": mlp, "lstm": lstm}[name]
    out = tmp_path / "int8"
    summary = compress(run, out, "method=quantize")
    before, after = summary["before"], summary["after"]
    assert after["weights_bytes"] <= 0.35 * before["weights_bytes"]
    assert abs(after["metrics"]["accuracy"] - before["metrics"]["accuracy"]) <= 0.01
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0
    kinds = {layer["kind"] for layer in after["layers"]}
    assert kinds == ({"DynamicQuantizedLinear"} if name == "mlp" else {"DynamicQuantizedLSTM", "DynamicQuantizedLinear"})
    # read without unpickling anything but tensors; the int8 layers hold qint8 weights
    stored = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert stored["model"]["head.weight" if name == "lstm" else "net.1.weight"].dtype == torch.qint8
    if name == "lstm":
        assert stored["model"]["rnn.weight_hh_l0"].dtype == torch.qint8
    assert reloaded_metrics(out)["accuracy"] == pytest.approx(after["metrics"]["accuracy"])
    assert_loads_the_very_int8_values(out, stored["model"])


def assert_loads_the_very_int8_values(out: Path, stored: dict) -> None:
    """The loader rebuilds each int8 layer from the stored values and scales, not by
    quantizing their fp32 approximation again."""
    from bigmodel_cli.compress.quantize import int8_entries
    from bigmodel_cli.build.inference import open_trained, ready_model

    model = ready_model(open_trained(str(out)), torch.device("cpu"))
    layers = [name for name, module in model.named_modules() if module._get_name().startswith("DynamicQuantized")]
    assert layers
    for name in layers:
        for key, tensor in int8_entries(model.get_submodule(name), f"{name}.").items():
            if tensor.is_quantized:
                assert torch.equal(tensor.int_repr(), stored[key].int_repr()), key
                assert torch.equal(tensor.dequantize(), stored[key].dequantize()), key


@pytest.mark.unit
def test_quantization_names_the_layers_it_leaves_in_fp32():
    from bigmodel_cli.compress.quantize import plan
    from bigmodel_cli.errors import UserError
    from bigmodel_cli.models.gpt import GPT

    chosen, kept = plan(GPT(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16), per_channel=True)
    assert set(chosen) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"}
    assert "tied to tok_emb" in kept["lm_head"] and "table lookup" in kept["tok_emb"]
    assert "normalization" in kept["ln_f"]
    with pytest.raises(UserError, match="no layer that int8 quantization covers.*convolutions need static"):
        plan(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), per_channel=True)


@pytest.mark.integration
@torch.no_grad()
def test_gpt_gets_weight_only_int8_that_reloads_exactly(gpt, tmp_path):
    """Weight-only int8 of a char GPT: int8 weights with a scale per output channel, the
    tied head and embedding one table stored once, a file far smaller than fp32's weights,
    val perplexity within 1%, and the reloaded model computes exactly what the model did
    right after quantization."""
    from bigmodel_cli.compress import weight_only
    from bigmodel_cli.build.inference import open_trained, ready_model

    source = digest(gpt)
    out = tmp_path / "int8"
    summary = compress(gpt, out, "method=quantize", "split=val")
    before, after = summary["before"], summary["after"]
    assert {entry["scheme"] for entry in summary["quantized"]} == {"weight_only"}
    tied = {entry["name"]: entry.get("tied_to") for entry in summary["quantized"]}
    assert tied["lm_head"] == "tok_emb" and tied["tok_emb"] == "lm_head" and tied["blocks.1.mlp.fc"] is None
    assert set(summary["kept"]) == {"pos_emb", "ln_f"} | {f"blocks.{i}.ln_{j}" for i in (0, 1) for j in (1, 2)}
    assert after["weights_bytes"] <= 0.35 * before["weights_bytes"]  # measured 0.31 (pos_emb, norms, scales fp32)
    assert after["file_bytes"] <= 0.40 * before["weights_bytes"]  # the whole file, config included: 0.36
    assert abs(after["metrics"]["perplexity"] / before["metrics"]["perplexity"] - 1) <= 0.01
    assert {layer["kind"] for layer in after["layers"]} >= {"Int8WeightOnlyLinear", "Int8WeightOnlyEmbedding"}
    assert "| `lm_head` | weight-only int8 | one per output channel | `tok_emb`" in (out / "report.md").read_text()

    stored = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]  # plain tensors only
    assert stored["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert stored["blocks.0.attn.qkv.weight_scale"].shape == (3 * 64,)
    assert stored["pos_emb.weight"].dtype == torch.float32
    head, table = stored["lm_head.weight"], stored["tok_emb.weight"]
    assert head.dtype == torch.int8 and head.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()

    fp32 = ready_model(open_trained(str(gpt)), torch.device("cpu"))
    tokens = torch.randint(0, fp32.tok_emb.num_embeddings, (4, 32), generator=torch.Generator().manual_seed(0))
    fp32_logits = fp32(tokens)
    quantized = weight_only.convert(fp32, weight_only.plan(fp32)[0])  # as compress did it
    expected = quantized(tokens)
    reloaded = ready_model(open_trained(str(out)), torch.device("cpu"))
    assert isinstance(reloaded.lm_head, weight_only.Int8WeightOnlyLinear) and reloaded.lm_head.weight is reloaded.tok_emb.weight
    assert torch.equal(reloaded(tokens), expected)
    assert not torch.equal(expected, fp32_logits)  # it really is int8
    torch.testing.assert_close(expected, fp32_logits, atol=0.05, rtol=0)
    assert reloaded_metrics(out, "val")["perplexity"] == pytest.approx(after["metrics"]["perplexity"])
    assert digest(gpt) == source


@pytest.mark.unit
def test_a_weight_only_checkpoint_with_float_weights_is_refused(gpt, tmp_path):
    from bigmodel_cli.engine.checkpoint import save_checkpoint
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.errors import UserError

    out = tmp_path / "int8"
    compress(gpt, out, "method=quantize", "latency_repeats=1", "latency_warmup=0")
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["blocks.0.mlp.fc.weight"] = state["model"]["blocks.0.mlp.fc.weight"].float()
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    with pytest.raises(UserError, match="damaged: its config lists blocks.0.mlp.fc as weight-only int8"):
        ready_model(open_trained(str(out)), torch.device("cpu"))


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["nan_scale", "quint8"])
def test_a_dynamic_int8_checkpoint_with_damaged_int8_weights_is_refused(damage, mlp, tmp_path):
    """A NaN scale crashed torch's kernels (or made every output NaN); quint8 values crashed them."""
    from bigmodel_cli.engine.checkpoint import save_checkpoint
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.errors import UserError

    out = tmp_path / "int8"
    compress(mlp, out, "method=quantize", "latency_repeats=1", "latency_warmup=0")
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    values = state["model"]["net.1.weight"].dequantize()
    if damage == "nan_scale":
        rows = values.shape[0]
        state["model"]["net.1.weight"] = torch.quantize_per_channel(
            values, torch.full((rows,), float("nan"), dtype=torch.double), torch.zeros(rows, dtype=torch.long), 0,
            torch.qint8)
    else:
        state["model"]["net.1.weight"] = torch.quantize_per_tensor(values, 0.01, 128, torch.quint8)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    with pytest.raises(UserError, match="damaged: its config lists net.1 as int8-quantized, .* qint8 weights and "
                                        "finite scales"):
        ready_model(open_trained(str(out)), torch.device("cpu"))


@pytest.mark.unit
def test_a_weight_only_checkpoint_with_a_nan_scale_is_refused(gpt, tmp_path):
    from bigmodel_cli.engine.checkpoint import save_checkpoint
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.errors import UserError

    out = tmp_path / "int8"
    compress(gpt, out, "method=quantize", "latency_repeats=1", "latency_warmup=0")
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["blocks.0.mlp.fc.weight_scale"][0] = float("nan")
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    with pytest.raises(UserError, match="lists blocks.0.mlp.fc as weight-only int8.*a finite scale per row"):
        ready_model(open_trained(str(out)), torch.device("cpu"))


@pytest.mark.unit
def test_weight_only_rounding_is_torchaos():
    """Our int8 values and scales are those of torchao's Int8WeightOnlyConfig."""
    pytest.importorskip("torchao", reason="a cross-check against torchao, which bigmodel does not need: pip install torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from bigmodel_cli.compress.weight_only import quantize_rows

    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    with torch.no_grad():
        layer.weight[3] = 0  # a row of zeros: the smallest scale, all zeros
    values, scale = quantize_rows(layer.weight)
    quantize_(nn.Sequential(layer), Int8WeightOnlyConfig())
    assert torch.equal(values, layer.weight.qdata)
    assert torch.equal(scale, layer.weight.scale.flatten())


@pytest.mark.unit
@torch.no_grad()
def test_weight_only_covers_gpt2s_conv1d_layers():
    """hf_causal_lm's GPT-2 stores its Linear layers transposed (transformers' Conv1D)."""
    transformers = pytest.importorskip("transformers", reason="pip install 'bigmodel[hf]'")
    from bigmodel_cli.compress.weight_only import convert, plan

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 50, (2, 16))
    fp32_logits = model(tokens).logits
    layers, kept = plan(model)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "lm_head", "transformer.wte"} <= set(layers)
    assert "transformer.wpe" in kept
    convert(model, layers)
    assert model.lm_head.weight is model.transformer.wte.weight
    logits = model(tokens).logits
    assert not torch.equal(logits, fp32_logits)
    torch.testing.assert_close(logits, fp32_logits, atol=0.02, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["method=prune", "prune.amount=1.5"], "prune.amount must be between 0 and 1"),
    (["method=squeeze"], "unknown method 'squeeze'; use method=prune or method=quantize"),
    (["method=quantize", "quantize.skip=[net.1,net.4,net.7]"], "has no layer that int8 quantization covers"),
    (["method=quantize", "quantize.scheme=weight_only", "quantize.per_channel=false"],
     "weight-only int8 always has one scale per output channel"),
])
@pytest.mark.integration
def test_bad_input_is_one_line_and_writes_nothing(args, message, mlp, run_cli):
    source = digest(mlp)
    result = run_cli("compress", f"ckpt={mlp}", *args)
    assert result.returncode == 2
    assert len(outcome_lines(result.stderr)) == 1 and message in result.stderr, result.output
    assert not list((result.cwd / "outputs").glob("compress/*/*"))
    assert digest(mlp) == source


@pytest.mark.integration
def test_a_file_that_is_no_bigmodel_checkpoint_is_refused(tmp_path, run_cli):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    result = run_cli("compress", f"ckpt={tmp_path / 'other.pt'}", "method=quantize")
    assert result.returncode == 2 and "is not a bigmodel checkpoint" in result.stderr, result.output


@pytest.mark.integration
def test_compress_then_eval_from_the_command_line(mlp, run_cli):
    result = run_cli("compress", f"ckpt={mlp}", "method=quantize", *FAST_MEASURE)
    assert result.returncode == 0, result.output
    out = next((result.cwd / "outputs" / "compress").glob("*/*"))
    summary = json.loads((out / "compress.json").read_text())
    assert "weights, serialized" in result.stdout and "kept in fp32" not in result.stderr
    evaluated = run_cli("eval", f"ckpt={out}")
    assert evaluated.returncode == 0, evaluated.output
    report = json.loads(next((result.cwd / "outputs" / "eval").glob("*/*/eval.json")).read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(summary["after"]["metrics"]["accuracy"])
