"""data=hf: Hugging Face datasets sources (local files and save_to_disk folders), offline."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from conftest import outcome_lines

datasets = pytest.importorskip("datasets", reason="pip install 'bigmodel[datasets]' (Hugging Face datasets)")


FAST = ("trainer.progress=plain", "trainer.threads=1")
POSITIVE = ["great fun", "lovely day", "wonderful film", "really good", "so happy"]
NEGATIVE = ["awful mess", "terrible day", "bad film", "really poor", "so sad"]

# A user's own classifier over token ids (no built-in model classifies token sequences).
BAG_OF_EMBEDDINGS = '''
import torch
from torch import nn


class Bag(nn.Module):
    def __init__(self, vocab_size, num_outputs, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(dim=1))
'''


def write_reviews(path: Path, n: int = 240, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            good = i % 2 == 0
            text = " ".join(rng.choice(POSITIVE if good else NEGATIVE) for _ in range(3))
            f.write(json.dumps({"text": text, "sentiment": "pos" if good else "neg"}) + "\n")


@pytest.mark.integration
def test_text_classification_from_jsonl_trains_and_reuses_its_token_cache(run_cli, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl")
    (tmp_path / "bag.py").write_text(BAG_OF_EMBEDDINGS)
    args = ("train", "model=custom", "model._target_=bag.Bag", "data=hf", "data.files=reviews.jsonl",
            "data.label_column=sentiment", "data.block_size=32", "data.cache_dir=cache", "optim=adam",
            "optim.lr=1e-2", "trainer.max_steps=60", *FAST)
    first = run_cli(*args)
    assert first.returncode == 0, first.output
    summary = json.loads(next(tmp_path.glob("outputs/*/*/summary.json")).read_text())
    assert summary["test"]["accuracy"] > 0.9
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "train_x.npy").is_file()
    stamp = (cached[0] / "state.json").stat().st_mtime_ns
    second = run_cli(*args)
    assert second.returncode == 0, second.output
    assert list((tmp_path / "cache").iterdir()) == cached  # same settings, same files: the cache is read
    assert (cached[0] / "state.json").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_language_modelling_on_a_saved_dataset_folder_then_generate(run_cli, tmp_path):
    corpus = [f"line {i}: to be or not to be, that is the question" for i in range(300)]
    parts = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": corpus[:270]}),
                                  "validation": datasets.Dataset.from_dict({"text": corpus[270:]})})
    parts.save_to_disk(str(tmp_path / "saved"))
    result = run_cli("train", "model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data=hf",
                     "data.path=saved", "data.tokenizer=char", "data.block_size=32", "data.cache_dir=cache",
                     "trainer.max_steps=20", *FAST)
    assert result.returncode == 0, result.output
    run_dir = next(tmp_path.glob("outputs/*/*/summary.json")).parent
    sample = run_cli("generate", f"ckpt={run_dir}", "max_new_tokens=40", "num_samples=1")
    assert sample.returncode == 0, sample.output
    assert set(sample.stdout.strip()) <= set("\n".join(corpus)), sample.stdout


@pytest.mark.parametrize("overrides, expected", [
    (("data.files=reviews.jsonl", "data.label_column=label"),
     "data.label_column=label is not a column of the train split; its columns are text, sentiment"),
    (("data.files=missing.jsonl",), "data.files: missing.jsonl is not a file"),
    (("data.files=empty.jsonl",), "data.files: empty.jsonl is empty"),
    (("data.files=reviews.jsonl", "data.path=elsewhere"), "needs exactly one of data.path"),
    (("data.files=notes.doc",), "data.files must all be one of"),
    (("data.path=reviews.jsonl",), "is not a folder"),
])
@pytest.mark.integration
def test_bad_sources_are_one_line(run_cli, tmp_path, overrides, expected):
    write_reviews(tmp_path / "reviews.jsonl", n=20)
    (tmp_path / "notes.doc").write_text("hello")
    (tmp_path / "empty.jsonl").write_text("")
    result = run_cli("train", "data=hf", *overrides, "data.cache_dir=cache", "trainer.max_steps=1", *FAST)
    assert result.returncode != 0
    lines = outcome_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.e2e
def test_a_damaged_file_and_a_missing_extra_are_one_line(run_cli, tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    result = run_cli("train", "data=hf", "data.files=broken.parquet", "data.cache_dir=cache", *FAST)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "could not read data.files" in outcome_lines(result.stderr)[0]
    shadow = tmp_path / "shadow" / "datasets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    write_reviews(tmp_path / "reviews.jsonl", n=20)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("train", "data=hf", "data.files=reviews.jsonl", *FAST, env=env)
    assert result.returncode != 0
    assert outcome_lines(result.stderr) == ["error: data=hf needs Hugging Face datasets: "
                                            "pip install 'bigmodel[datasets]'"]


def make_reviews_data(tmp_path, **settings):
    from bigmodel_cli.data.hf import HFData

    if not (tmp_path / "reviews.jsonl").exists():
        write_reviews(tmp_path / "reviews.jsonl", n=40)
    return HFData(files=str(tmp_path / "reviews.jsonl"), label_column="sentiment", block_size=16,
                  cache_dir=str(tmp_path / "cache"), **settings)


def write_npy(path: Path, array) -> None:
    import numpy as np

    np.save(path, array, allow_pickle=False)


@pytest.mark.parametrize("damage", [
    lambda f: (f / "train_x.npy").write_bytes(b"\x93NUMPY garbage"),
    lambda f: (f / "state.json").write_text('{"tokenizer": null, "labels": ["neg", "pos"]}'),
    lambda f: (f / "state.json").write_text('{"tokenizer": {"kind": "byte"}, "labels": "xx"}'),
    lambda f: (f / "state.json").write_text("[1, 2]"),
    lambda f: write_npy(f / "train_y.npy", __import__("numpy").zeros(0, dtype="int64")),
    lambda f: write_npy(f / "train_x.npy", __import__("numpy").zeros((3, 5), dtype="int64")),
    lambda f: write_npy(f / "val_y.npy", __import__("numpy").full(4, 7, dtype="int64")),
    lambda f: (f / "test_x.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, "
                                              b"'shape': (68719476736,), }" + b" " * 40 + b"\n"),
])
@pytest.mark.unit
def test_a_damaged_token_cache_is_rebuilt(tmp_path, damage):
    first = make_reviews_data(tmp_path)
    first.setup()
    folder = next((tmp_path / "cache").iterdir())
    damage(folder)
    again = make_reviews_data(tmp_path)
    again.setup()
    assert again.splits["train"][0].equal(first.splits["train"][0])
    assert again.splits["val"][1].equal(first.splits["val"][1]) and again.labels == ["neg", "pos"]
    rebuilt = make_reviews_data(tmp_path)  # and the cache was written again, whole
    rebuilt.setup()
    assert rebuilt.splits["test"][0].equal(first.splits["test"][0])


@pytest.mark.unit
def test_a_checkpoint_vocabulary_reuses_the_cache_it_matches_and_never_overwrites_it(tmp_path):
    first = make_reviews_data(tmp_path, tokenizer="char")
    first.setup()
    state = first.state_dict()
    folder = next((tmp_path / "cache").iterdir())
    stamp = (folder / "state.json").stat().st_mtime_ns
    same = make_reviews_data(tmp_path, tokenizer="char")
    same.load_state_dict(state)  # as eval and resume do
    same.setup()
    other = make_reviews_data(tmp_path, tokenizer="char")
    other.load_state_dict({**state, "tokenizer": {"kind": "char", "vocab": sorted(set(state["tokenizer"]["vocab"]) | {"~"})}})
    other.setup()
    assert other.spec.vocab_size == first.spec.vocab_size + 1
    assert same.splits["train"][0].equal(first.splits["train"][0])
    assert list((tmp_path / "cache").iterdir()) == [folder] and (folder / "state.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("rows, expected", [
    ([{"text": "a", "label": [1]}, {"text": "b", "label": [2]}], "labels must be text or finite numbers"),
    ([{"text": "a", "label": float("nan")}, {"text": "b", "label": 1.0}], "labels must be text or finite numbers"),
    ([{"text": "a", "label": None}, {"text": "b", "label": "x"}], "labels must be text or finite numbers"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "a single label ('x')"),
])
@pytest.mark.unit
def test_labels_that_cannot_be_classes_are_one_line(tmp_path, rows, expected):
    from bigmodel_cli.data.hf import HFData
    from bigmodel_cli.errors import UserError

    with (tmp_path / "rows.jsonl").open("w") as f:
        for row in rows * 10:
            f.write(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        HFData(files=str(tmp_path / "rows.jsonl"), label_column="label", cache_dir=str(tmp_path / "cache")).setup()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


@pytest.mark.integration
def test_bert_classifies_a_jsonl_file_through_data_hf(run_cli, tmp_path):
    """Issue 15, acceptance 1: BertForSequenceClassification (model=hf_classifier) trains on a
    text-classification JSONL file through data=hf."""
    pytest.importorskip("transformers", reason="pip install 'bigmodel[hf]' (Hugging Face transformers)")
    write_reviews(tmp_path / "reviews.jsonl")
    result = run_cli("train", "model=hf_classifier", "data=hf", "data.files=reviews.jsonl",
                     "data.label_column=sentiment", "data.block_size=24", "data.cache_dir=cache", "optim=adam",
                     "optim.lr=1e-3", "trainer.max_steps=100", *FAST, timeout=600)
    assert result.returncode == 0, result.output
    summary = json.loads(next(tmp_path.glob("outputs/*/*/summary.json")).read_text())
    assert summary["test"]["accuracy"] > 0.9, summary["test"]


@pytest.mark.integration
def test_a_tokenizer_json_made_elsewhere_tokenizes_data_hf(run_cli, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    words = sorted({w for phrase in POSITIVE + NEGATIVE for w in phrase.split()})
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "words.json"))
    write_reviews(tmp_path / "reviews.jsonl")
    (tmp_path / "bag.py").write_text(BAG_OF_EMBEDDINGS)
    result = run_cli("train", "model=custom", "model._target_=bag.Bag", "data=hf", "data.files=reviews.jsonl",
                     "data.label_column=sentiment", "data.tokenizer=hf", "data.tokenizer_path=words.json",
                     "data.block_size=12", "data.cache_dir=cache", "optim=adam", "optim.lr=1e-2",
                     "trainer.max_steps=40", *FAST)
    assert result.returncode == 0, result.output
    summary = json.loads(next(tmp_path.glob("outputs/*/*/summary.json")).read_text())
    assert summary["test"]["accuracy"] > 0.9
    cached = json.loads(next((tmp_path / "cache").glob("*/state.json")).read_text())
    assert cached["tokenizer"]["kind"] == "hf"  # the words, not bytes


@pytest.mark.integration
def test_a_gpt2_classifier_reads_the_last_token_before_the_padding(run_cli, tmp_path):
    """A decoder classifier needs to know the padding id to classify batches of padded texts."""
    pytest.importorskip("transformers", reason="pip install 'bigmodel[hf]' (Hugging Face transformers)")
    write_reviews(tmp_path / "reviews.jsonl")
    result = run_cli("train", "model=hf_classifier", "model.source=gpt2", "data=hf", "data.files=reviews.jsonl",
                     "data.label_column=sentiment", "data.block_size=24", "data.cache_dir=cache", "optim=adam",
                     "optim.lr=1e-3", "trainer.max_steps=60", *FAST, timeout=600)
    assert result.returncode == 0, result.output
    summary = json.loads(next(tmp_path.glob("outputs/*/*/summary.json")).read_text())
    assert summary["test"]["accuracy"] > 0.9, summary["test"]
