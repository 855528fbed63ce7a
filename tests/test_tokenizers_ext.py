"""Tokenizers and token folders made elsewhere: nanoGPT's folders (meta.pkl, or GPT-2 tokens
with no meta at all), tokenizer=gpt2 (tiktoken) and tokenizer=hf (a tokenizer.json)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from bigmodel_cli.data.text_chunks import text_chunks
from bigmodel_cli.data.tokenizers import tokenizer_from_state
from bigmodel_cli.data.tokens import TokenFiles
from bigmodel_cli.errors import UserError
from conftest import REPO, outcome_lines


TINY_GPT = ("model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.block_size=32",
            "trainer.progress=plain", "trainer.threads=1", "trainer.eval_batches=2", "data.batch_size=4")
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak.  \n"
          "It's 1,000 times 'twas so — naïve café 日本語!\n\t\n") * 40


def shared_data(name: str) -> Path:
    """A folder of the project's shared test data (../shared/data), or a skip saying so."""
    for root in (REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if (root / name).exists():
            return root / name
    pytest.skip(f"the shared test data {name} is absent (looked in ../shared/data); see its README.md")


def one_error_line(result) -> str:
    lines = outcome_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ------------------------------------------------------------------ nanoGPT meta.pkl


@pytest.mark.integration
def test_nanogpt_char_folder_trains_and_generates_with_no_extra_keys(run_cli):
    folder = shared_data("nanogpt_shakespeare_char")
    trained = run_cli("train", "data=tokens", f"data.dir={folder}", "trainer.max_steps=30", *TINY_GPT,
                      "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    assert "vocabulary 65" in trained.output  # from meta.pkl, not typed in
    sampled = run_cli("generate", "ckpt=run", "prompt=ROMEO:", "max_new_tokens=80")
    assert sampled.returncode == 0, sampled.output
    alphabet = set(shared_data("tinyshakespeare.txt").read_text(encoding="utf-8"))  # the corpus it was made of
    assert len(alphabet) == 65
    text = sampled.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) >= 6 + 40 and set(text) <= alphabet, text
    # Another kind of tokenizer than the run's own is refused before anything is read.
    mismatch = run_cli("generate", "ckpt=run", "tokenizer=hf", "tokenizer.path=none.json")
    assert "trained with a char tokenizer" in one_error_line(mismatch)


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def nanogpt_folder(folder: Path, meta) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 10, 500).astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.pkl").write_bytes(meta if isinstance(meta, bytes) else pickle.dumps(meta))
    return folder


@pytest.mark.integration
def test_a_meta_pkl_that_runs_code_is_refused_and_runs_nothing(run_cli, tmp_path):
    marker = tmp_path / "pwned"
    folder = nanogpt_folder(tmp_path / "d", pickle.dumps(RunsShell(f"touch {marker}")))
    with pytest.raises(UserError, match=r"meta.pkl is refused \(it asks to run code \(posix.system\)\)"):
        TokenFiles(dir=str(folder)).setup()
    result = run_cli("train", "data=tokens", f"data.dir={folder}", "trainer.max_steps=2", *TINY_GPT)
    assert "asks to run code" in one_error_line(result)
    assert not marker.exists()


ITOS = {i: c for i, c in enumerate("\n abcdefgh")}
GOOD = {"vocab_size": 10, "itos": ITOS, "stoi": {c: i for i, c in ITOS.items()}}


@pytest.mark.parametrize("meta, problem", [
    ({**GOOD, "vocab_size": "10"}, "vocab_size is not a whole number"),
    ({**GOOD, "itos": {i: ITOS[i] for i in range(9)}}, "does not map each id 0..9"),
    ({**GOOD, "itos": {**ITOS, 3: "ab"}}, "distinct single characters"),
    ({**GOOD, "stoi": {**GOOD["stoi"], "a": 5}}, "stoi and itos disagree"),
    ({**GOOD, "extra": 0.5}, "holds a float, not plain data"),
    ([1, 2], "it is a list, not a dict"),
    (pickle.dumps(GOOD)[:-20], "not a readable pickle"),
    (b"\x80\x04" + b"K\x01" * (1 << 19), "more than a nanoGPT vocabulary needs"),
    # 50 bytes that claim 2^32 ids: refused by a count, not by building range(2^32)
    ({"vocab_size": 2**32, "itos": {0: "a"}}, "does not map each id"),
    # a few kB whose shared lists stand for 10^9 items (pickle's memo): refused within a budget
    (lambda: {"vocab_size": 1, "a": [[[1] * 1000] * 1000] * 1000}, "more than 1,048,576 items"),
])
@pytest.mark.unit
def test_a_damaged_meta_pkl_is_one_line(tmp_path, meta, problem):
    folder = nanogpt_folder(tmp_path / "d", meta() if callable(meta) else meta)
    with pytest.raises(UserError, match=problem) as err:
        TokenFiles(dir=str(folder)).setup()
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_a_good_meta_pkl_gives_the_vocabulary_and_a_char_tokenizer(tmp_path):
    data = TokenFiles(dir=str(nanogpt_folder(tmp_path / "d", GOOD)))
    data.setup()
    assert data.spec.vocab_size == 10
    tokenizer = tokenizer_from_state(data.state_dict()["tokenizer"])
    assert tokenizer.decode([3, 2, 1, 4]) == "ba c"


# ------------------------------------------------------------------ tokenizer=gpt2


@pytest.mark.unit
def test_gpt2_encodes_as_gpt2_does(gpt2_ranks):
    pytest.importorskip("tiktoken", reason="pip install 'bigmodel[tiktoken]'")
    from bigmodel_cli.data.pretrained_tokenizers import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.load(str(gpt2_ranks))
    assert tokenizer.encode("Hello world").tolist() == [15496, 995]
    assert tokenizer.encode("<|endoftext|>").tolist() != [50256]  # text, never the special token
    assert tokenizer.decode(tokenizer.encode(CORPUS)) == CORPUS
    assert tokenizer.decode([15496, 50300]) == "Hello\ufffd"  # a padded model's extra ids
    # Encoded in pieces, a text gives the very ids of encoding it whole, wherever it is cut.
    text = CORPUS[:400]  # "\n\n", "  \n" and "\t\n" are one token at a piece's end, not within
    whole = tokenizer.encoding.encode_ordinary(text)
    for size in range(1, len(text)):
        pieces = [tokenizer.encoding.encode_ordinary(piece) for piece in text_chunks(text, size)]
        assert [i for piece in pieces for i in piece] == whole, size
    assert len(list(text_chunks(CORPUS, 37))) == 40  # one safe cut a verse
    again = tokenizer_from_state(json.loads(json.dumps(tokenizer.state_dict())))
    assert again.encode("Hello world").tolist() == [15496, 995]


@pytest.mark.unit
def test_gpt2_refuses_another_ranks_file(tmp_path):
    pytest.importorskip("tiktoken", reason="pip install 'bigmodel[tiktoken]'")
    from bigmodel_cli.data.pretrained_tokenizers import GPT2Tokenizer

    fake = tmp_path / "gpt2.tiktoken"
    fake.write_text("SGVsbG8= 0\n")
    with pytest.raises(UserError, match="is not GPT-2's BPE ranks file"):
        GPT2Tokenizer.load(str(fake))
    with pytest.raises(UserError, match="does not exist"):
        GPT2Tokenizer.load(str(tmp_path / "absent.tiktoken"))


@pytest.mark.integration
def test_gpt2_prepare_train_generate(run_cli, tmp_path, gpt2_ranks):
    pytest.importorskip("tiktoken", reason="pip install 'bigmodel[tiktoken]'")
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    prepared = run_cli("prepare", "data.path=corpus.txt", "tokenizer=gpt2", f"tokenizer.path={gpt2_ranks}",
                       "out=tok")
    assert prepared.returncode == 0, prepared.output
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {"kind": "gpt2", "path": str(gpt2_ranks)}  # plain data: no ranks inside
    assert np.fromfile(tmp_path / "tok" / "train.bin", np.uint16)[:3].tolist() == [5962, 22307, 25]  # First Citizen:
    trained = run_cli("train", "data=tokens", "data.dir=tok", "trainer.max_steps=3", *TINY_GPT, "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    sampled = run_cli("generate", "ckpt=run", "prompt=First Citizen:", "max_new_tokens=20")
    assert sampled.returncode == 0, sampled.output
    assert sampled.stdout.startswith("First Citizen:") and len(sampled.stdout) > len("First Citizen:") + 20
    wrong = run_cli("prepare", "data.path=corpus.txt", "tokenizer=gpt2", "tokenizer.path=corpus.txt", "out=x")
    assert "is not GPT-2's BPE ranks file" in one_error_line(wrong)


@pytest.mark.integration
def test_a_nanogpt_gpt2_folder_decodes_with_tokenizer_gpt2(run_cli, tmp_path, gpt2_ranks):
    tiktoken = pytest.importorskip("tiktoken", reason="pip install 'bigmodel[tiktoken]'")
    from bigmodel_cli.data.pretrained_tokenizers import GPT2Tokenizer

    # As nanoGPT's data/shakespeare/prepare.py writes it: encode_ordinary, uint16, no meta.
    encoding = GPT2Tokenizer.load(str(gpt2_ranks)).encoding
    assert isinstance(encoding, tiktoken.Encoding)
    (tmp_path / "d").mkdir()
    half = len(CORPUS) // 2
    for split, text in (("train", CORPUS), ("val", CORPUS[half:])):
        np.array(encoding.encode_ordinary(text), dtype=np.uint16).tofile(tmp_path / "d" / f"{split}.bin")
    trained = run_cli("train", "data=tokens", "data.dir=d", "data.vocab_size=50304", "trainer.max_steps=3",
                      *TINY_GPT, "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    untold = run_cli("generate", "ckpt=run")
    assert "has no tokenizer" in one_error_line(untold) and "tokenizer=gpt2" in untold.stderr
    sampled = run_cli("generate", "ckpt=run", "tokenizer=gpt2", f"tokenizer.path={gpt2_ranks}", "prompt=All:",
                      "max_new_tokens=20")
    assert sampled.returncode == 0, sampled.output
    assert sampled.stdout.startswith("All:") and len(sampled.stdout) > len("All:") + 20
    char = run_cli("generate", "ckpt=run", "tokenizer=char")
    assert "generate takes tokenizer=gpt2 or tokenizer=hf" in one_error_line(char)


# ------------------------------------------------------------------ tokenizer=hf


def make_hf_tokenizer(path: Path, corpus: Path) -> None:
    """A WordPiece tokenizer with a normalizer, a post-processor and padding: not the
    byte-level kind bigmodel trains, as a tokenizer.json from the Hub would not be."""
    lib = pytest.importorskip("tokenizers", reason="pip install 'bigmodel[hf]'")
    tokenizer = lib.Tokenizer(lib.models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = lib.normalizers.Lowercase()
    tokenizer.pre_tokenizer = lib.pre_tokenizers.Whitespace()
    tokenizer.decoder = lib.decoders.WordPiece()
    trainer = lib.trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                            show_progress=False)
    tokenizer.train([str(corpus)], trainer=trainer)
    tokenizer.post_processor = lib.processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                                special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer.enable_padding(length=10**12)  # would abort the process if it were used
    tokenizer.save(str(path))


@pytest.mark.integration
def test_hf_tokenizer_prepare_train_generate(run_cli, tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    make_hf_tokenizer(tmp_path / "tokenizer.json", tmp_path / "corpus.txt")
    prepared = run_cli("prepare", "data.path=corpus.txt", "tokenizer=hf", "tokenizer.path=tokenizer.json", "out=tok")
    assert prepared.returncode == 0, prepared.output
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "hf" and meta["vocab_size"] <= 300
    ids = np.fromfile(tmp_path / "tok" / "train.bin", np.uint16)
    assert 1 not in ids[:50] and ids.max() < meta["vocab_size"]  # no [CLS] added per piece
    trained = run_cli("train", "data=tokens", "data.dir=tok", "trainer.max_steps=3", *TINY_GPT, "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    shutil.rmtree(tmp_path / "tok")
    (tmp_path / "tokenizer.json").unlink()  # the checkpoint carries the tokenizer itself
    sampled = run_cli("generate", "ckpt=run", "prompt=First Citizen:", "max_new_tokens=20")
    assert sampled.returncode == 0, sampled.output
    assert sampled.stdout.startswith("first citizen :") and len(sampled.stdout) > len("first citizen :") + 20


@pytest.mark.parametrize("content, problem", [
    (b"not json at all", "not JSON"),
    (b'{"model": 3}', "not a JSON object with a model"),
    (b'{"model": {"type": "Nope"}}', "does not work with the tokenizers library"),
    (b"\xff\xfe", "not UTF-8 text"),
])
@pytest.mark.unit
def test_a_file_that_is_not_a_tokenizer_is_one_line(tmp_path, content, problem):
    pytest.importorskip("tokenizers", reason="pip install 'bigmodel[hf]'")
    from bigmodel_cli.data.pretrained_tokenizers import HFTokenizer

    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(UserError, match=problem) as err:
        HFTokenizer.load(str(tmp_path / "tokenizer.json"))
    assert "\n" not in str(err.value)


@pytest.mark.integration
def test_a_damaged_hf_tokenizer_is_one_line_through_prepare(run_cli, tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    make_hf_tokenizer(tmp_path / "tokenizer.json", tmp_path / "corpus.txt")
    whole = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(whole[: len(whole) // 2])  # cut short
    result = run_cli("prepare", "data.path=corpus.txt", "tokenizer=hf", "tokenizer.path=tokenizer.json", "out=tok")
    assert "is not a Hugging Face tokenizer (not JSON)" in one_error_line(result)
    assert not (tmp_path / "tok").exists()


@pytest.mark.unit
def test_a_sentencepiece_style_tokenizer_encodes_a_long_text_as_a_whole():
    """A "▁" prepended at each text's start (Metaspace) would change the ids where a long text
    is cut into pieces: such a tokenizer encodes the text whole."""
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    from bigmodel_cli.data.pretrained_tokenizers import HFTokenizer

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefgh▁\n")}}
    made = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    made.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    text = "abc def\ngh ab\n" * 20000  # longer than one piece of text_chunks
    ours = HFTokenizer.from_json(made.to_str(), "a test tokenizer").encode(text)
    assert ours.tolist() == made.encode(text, add_special_tokens=False).ids
