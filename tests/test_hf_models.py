"""Models from Hugging Face transformers: model=hf_causal_lm, model=hf_classifier, and a
transformers class named directly with model=custom. All randomly initialised and tiny;
nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bigmodel_cli.errors import UserError, root_cause
from conftest import outcome_lines

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'bigmodel[hf]'")
try:  # transformers imports its models lazily: a broken dependency shows only now
    from transformers import BertForSequenceClassification, GPT2LMHeadModel  # noqa: F401
except Exception as err:  # noqa: BLE001 - any failure to import means these tests cannot run here
    pytest.skip(f"transformers is installed but its models do not import ({root_cause(err)})",
                allow_module_level=True)

from bigmodel_cli.build.parts import build_model, check_model_fits  # noqa: E402
from bigmodel_cli.commands.train import train  # noqa: E402
from bigmodel_cli.config import ProgressMode, TrainerConfig  # noqa: E402
from bigmodel_cli.data.base import DataModule, DataSpec  # noqa: E402
from bigmodel_cli.engine.distributed import repeated_blocks  # noqa: E402
from bigmodel_cli.engine.logits import logits_of  # noqa: E402
from bigmodel_cli.engine.tasks import task_for  # noqa: E402
from bigmodel_cli.engine.trainer import RunContext, Trainer, TrainingParts  # noqa: E402
from bigmodel_cli.telemetry import Telemetry  # noqa: E402


# The tiniest GPT-2 that still has two blocks, on 16-character windows; dropout stays on
# (GPT-2's default 0.1), so exact resume must continue the random streams too.
TINY_LM = ("model=hf_causal_lm", "model.n_layer=2", "model.n_head=2", "model.n_embd=16", "data=text",
           "data.block_size=16", "data.batch_size=4", "trainer.eval_batches=2", "trainer.log_every=1",
           "trainer.progress=plain", "trainer.threads=1")
GPT2_CUSTOM = ("model=custom", "model._target_=transformers.GPT2LMHeadModel",
               "+model.config._target_=transformers.GPT2Config", "+model.config.n_layer=1",
               "+model.config.n_head=2", "+model.config.n_embd=16")


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


@pytest.mark.integration
def test_hf_causal_lm_trains_resumes_exactly_and_generates(compose, run_cli, tmp_path):
    args = (*TINY_LM, "trainer.max_steps=6", "trainer.val_every=3", "trainer.checkpoint_every=1",
            "trainer.keep_last=10")
    full = tmp_path / "full"
    train(compose(*args), full)
    losses = step_losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    ckpt = full / "checkpoints" / "step_00000003.pt"
    resumed = tmp_path / "resumed"
    out = train(compose(*args, f"trainer.resume={ckpt}"), resumed)
    assert out["resumed_from"] == str(ckpt)
    assert step_losses(resumed) == {s: v for s, v in losses.items() if s > 3}
    summary = json.loads((full / "summary.json").read_text())
    assert json.loads((resumed / "summary.json").read_text())["test"] == summary["test"]

    sampled = run_cli("generate", f"ckpt={full}", "prompt=def", "max_new_tokens=12", "temperature=0")
    assert sampled.returncode == 0, sampled.output
    text = sampled.stdout.strip()
    assert text.startswith("def") and len(text) == len("def") + 12


@pytest.mark.integration
def test_hf_blocks_are_found_recomputed_in_bf16_and_flops_are_estimated(compose, tmp_path):
    from bigmodel_cli.build.training import build_run

    cfg = compose(*TINY_LM, "trainer.max_steps=2", "model.activation_checkpointing=true", "trainer.precision=bf16")
    run = build_run(cfg, tmp_path, {"model": "hf_causal_lm", "data": "text"})
    assert run.trainer.fit().steps == 2
    run.telemetry.close()
    model = run.trainer.raw_model
    assert isinstance(model, GPT2LMHeadModel)  # no wrapper
    blocks = repeated_blocks(model)
    assert blocks == list(model.transformer.h) and len(blocks) == 2  # what FSDP shards, one by one
    assert all(block.forward.__name__ == "forward_with_recompute" for block in blocks)
    spec = run.trainer.data.spec
    assert model.config.vocab_size == spec.vocab_size and model.config.n_positions == spec.block_size
    expected = 6.0 * run.parameters + 12.0 * 2 * 16 * 16
    assert run.trainer.flops_per_unit == pytest.approx(expected)


@pytest.mark.integration
def test_a_transformers_class_with_a_nested_config_gets_the_data_sizes(compose, tmp_path):
    out = train(compose(*TINY_LM[4:], *GPT2_CUSTOM, "trainer.max_steps=2", "trainer.val_every=2"), tmp_path)
    assert out["steps"] == 2
    stored = (tmp_path / "config.yaml").read_text()
    assert "GPT2Config" in stored and "vocab_size" not in stored  # the sizes come from the data, not the config


@pytest.mark.integration
def test_tuple_outputs_train(compose, tmp_path):
    # (GPT-2 and Llama with config.return_dict=false fail inside transformers 5 itself, whose
    # inner model then returns a tuple its LM head reads as an object; BERT's does not.)
    data = TokenLabels()
    data.setup()
    cfg = compose("model=hf_classifier", "+model.config.return_dict=false").model
    model = build_model(cfg, data.spec)
    assert isinstance(model(data.splits["train"][0][:2]), tuple)
    trainer = hand_built_trainer(model, data, tmp_path)
    assert trainer.fit().steps == 4


class TokenLabels(DataModule):
    """Token sequences with a class each (the label is the first token's id mod 3)."""

    def __init__(self, batch_size: int = 8, vocab: int = 30, length: int = 12, classes: int = 3):
        super().__init__(batch_size)
        self.vocab, self.length, self.classes = vocab, length, classes

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, self.vocab, (96, self.length), generator=gen)
        y = x[:, 0] % self.classes
        self.splits = {"train": (x[:64], y[:64]), "val": (x[64:80], y[64:80]), "test": (x[80:], y[80:])}
        self._spec = DataSpec("classification", "tokens", (self.length,), self.classes,
                              vocab_size=self.vocab, block_size=self.length)


def hand_built_trainer(model: nn.Module, data: DataModule, run_dir: Path, steps: int = 4) -> Trainer:
    parts = TrainingParts(model, torch.optim.AdamW(model.parameters(), lr=1e-3), lambda total_steps: (lambda s: 1.0),
                          data, task_for("classification"))
    settings = TrainerConfig(max_steps=steps, log_every=2, val_every=steps, progress=ProgressMode.plain)
    return Trainer(parts, settings, RunContext(run_dir, Telemetry(run_dir, "plain")))


@pytest.mark.integration
def test_hf_classifier_is_a_bert_sized_for_the_data_and_trains(compose, tmp_path):
    data = TokenLabels()
    data.setup()
    model = build_model(compose("model=hf_classifier").model, data.spec, "hf_classifier")
    assert isinstance(model, BertForSequenceClassification)
    assert (model.config.num_labels, model.config.vocab_size) == (3, 30)
    assert model.config.max_position_embeddings == 12 and len(repeated_blocks(model)) == 2
    check_model_fits(model, data, "classification")  # logits (2, 3) from its SequenceClassifierOutput
    trainer = hand_built_trainer(model, data, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.fit()
    trainer.telemetry.close()
    assert result.steps == 4 and set(result.val) == {"loss", "accuracy"}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.unit
def test_model_and_data_of_different_tasks_are_refused_before_building(compose):
    from bigmodel_cli.build.parts import build_model as build

    with pytest.raises(UserError, match=r"model=hf_classifier cannot train on data=text: it is for classification.*"
                                        r"models for this data: gpt, hf_causal_lm"):
        build(compose("model=hf_classifier").model, DataSpec("language_modeling", "tokens", (16,), 50, 50, 16),
              "hf_classifier", "text")


class Broken(nn.Module):
    def forward(self, x):
        raise AttributeError("'tuple' object has no attribute 'last_hidden_state'")


class NoLogitsHere(nn.Module):
    def forward(self, x):
        return {"hidden": "not a tensor"}


@pytest.mark.parametrize("model,cause", [
    (Broken(), "AttributeError: 'tuple' object has no attribute 'last_hidden_state'"),
    (NoLogitsHere(), "NoLogits: it returns a dict with no logits tensor in it"),
])
@pytest.mark.unit
def test_a_model_that_fails_the_fit_check_is_one_line(model, cause):
    data = TokenLabels()
    data.setup()
    with pytest.raises(UserError) as caught:
        check_model_fits(model, data, "classification")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{type(model).__name__} cannot read this data: given a batch (2, 12) of int64 "
                              f"it failed with {cause}")


@pytest.mark.unit
def test_logits_are_read_from_every_kind_of_output():
    logits = torch.randn(2, 3)
    output = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    for out in (logits, output, (logits, "rest"), [logits], {"logits": logits, "x": 1}, {"y": logits}):
        assert logits_of(out) is logits


@pytest.mark.unit
def test_a_transformers_lm_of_the_wrong_vocabulary_names_the_fix(compose):
    from bigmodel_cli.data.text import CharText

    data = CharText(batch_size=2, path=None, block_size=8)
    data.setup()
    model = GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=500))
    with pytest.raises(UserError, match=rf"GPT2LMHeadModel returns \(2, 8, 500\) for a batch \(2, 8\) of int64, but this "
                                        rf"language_modeling data needs \(2, 8, {data.spec.vocab_size}\); its last "
                                        rf"dimension is the vocabulary: give it vocab_size={data.spec.vocab_size}"):
        check_model_fits(model, data, "language_modeling")


@pytest.mark.parametrize("overrides,message", [
    (("model.source=gtp2",), "did you mean model.source=gpt2?"),
    (("model.source=./no/such/folder",), "is not a folder (bigmodel never downloads models)"),
    (("model.pretrained=true",), "model.pretrained=true needs model.source to be a local folder"),
])
@pytest.mark.unit
def test_hf_sources_that_cannot_be_built_are_one_line(compose, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        build_model(compose("model=hf_causal_lm", *overrides).model, DataSpec("language_modeling", "tokens", (8,),
                                                                              20, 20, 8))


@pytest.mark.unit
def test_pretrained_from_a_local_folder_never_downloads(compose, tmp_path):
    source = GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=40, n_positions=32))
    source.save_pretrained(tmp_path / "tiny")  # safetensors
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    cfg = compose("model=hf_causal_lm", f"model.source={tmp_path / 'tiny'}", "model.pretrained=true").model
    model = build_model(cfg, DataSpec("language_modeling", "tokens", (16,), 40, 40, 16))
    assert model.config.n_layer == 1  # its own shape, not model.n_layer
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, source.transformer.h[0].attn.c_attn.weight)
    resized = build_model(cfg, DataSpec("language_modeling", "tokens", (16,), 30, 30, 16))
    assert resized.get_input_embeddings().num_embeddings == 30
    with pytest.raises(UserError, match="data.block_size=64 is longer than the 32 positions"):
        build_model(cfg, DataSpec("language_modeling", "tokens", (64,), 40, 40, 64))


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_a_hf_causal_lm(run_cli, strategy):
    done = run_cli("train", *TINY_LM, "trainer.devices=2", f"trainer.strategy={strategy}", "trainer.max_steps=3",
                   "trainer.val_every=3")
    assert done.returncode == 0, done.output
    assert done.summary()["steps"] == 3
    assert (done.run_dir() / "train_rank1.log").is_file()
    last = done.run_dir() / "checkpoints" / ("last.dcp" if strategy == "fsdp" else "last.pt")
    assert last.exists()


@pytest.mark.integration
def test_pretrained_weights_that_would_run_code_are_refused(run_cli, tmp_path):
    """A pytorch_model.bin is a pickle: loaded with weights_only, a file that asks to run code
    is refused in one line that never suggests turning weights_only off."""
    import pickle

    folder = tmp_path / "evil_gpt2"
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32).save_pretrained(folder)
    marker = tmp_path / "ran"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsShell()))
    result = run_cli("train", "model=hf_causal_lm", f"model.source={folder}", "model.pretrained=true", "data=text",
                     "data.block_size=16", "trainer.max_steps=1", "trainer.progress=plain", "trainer.threads=1")
    assert result.returncode != 0 and not marker.exists()
    lines = outcome_lines(result.stderr)
    assert len(lines) == 1 and "are refused" in lines[0] and "weights_only" not in lines[0], result.output
