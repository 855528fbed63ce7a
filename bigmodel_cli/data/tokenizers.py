"""Tokenizers for `bigmodel prepare` and `bigmodel generate`: char, byte and (with the
optional Hugging Face `tokenizers` package) byte-level BPE, trained here; and GPT-2's and
any Hugging Face tokenizer.json, made elsewhere (data/pretrained_tokenizers.py).

Each is saved as plain JSON-able state (in meta.json, and in checkpoints), never pickled.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bigmodel_cli.data.pretrained_tokenizers import GPT2Tokenizer, HFTokenizer, gpt2_problem, hf_problem
from bigmodel_cli.data.text_chunks import text_chunks
from bigmodel_cli.errors import UserError, first_line


def encode(text: str, vocab: List[str]) -> np.ndarray:
    """Characters -> vocabulary ids, vectorised (no Python loop over the characters)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    points = np.array([ord(ch) for ch in vocab], dtype=np.uint32)
    order = np.argsort(points)
    pos = np.minimum(np.searchsorted(points[order], codes), len(points) - 1)
    known = points[order][pos] == codes
    if not known.all():
        unknown = sorted(set(chr(c) for c in codes[~known].tolist()))
        raise UserError(f"the text has {len(unknown)} characters outside the model's vocabulary "
                        f"({''.join(unknown[:20])!r}); use text in the alphabet the model was trained on")
    ids = order[pos]
    return ids.astype(np.int64)


class CharTokenizer:
    kind = "char"

    def __init__(self, vocab: List[str]):
        self.vocab = list(vocab)

    @classmethod
    def from_vocab(cls, vocab: Any, where: str) -> "CharTokenizer":
        """From a stored vocabulary (a checkpoint's): a UserError naming `where` if it is broken."""
        problem = vocabulary_problem(vocab)
        if problem:
            raise UserError(f"{where} is broken ({problem}); use another checkpoint")
        return cls(vocab)

    @classmethod
    def fit(cls, text: str, vocab_size: Optional[int] = None) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        return encode(text, self.vocab)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] if 0 <= i < len(self.vocab) else "\ufffd" for i in ids)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab}


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, any text, no training."""

    kind = "byte"
    vocab_size = 256

    @classmethod
    def fit(cls, text: str, vocab_size: Optional[int] = None) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind}


class BPETokenizer:
    """Byte-level BPE trained locally with Hugging Face `tokenizers` (pip install tokenizers)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def _library():
        try:
            import tokenizers
        except ImportError:
            raise UserError("tokenizer=bpe needs the tokenizers package: pip install tokenizers "
                            "(or bigmodel[bpe]); or use tokenizer=char or tokenizer=byte") from None
        return tokenizers

    @classmethod
    def fit(cls, text: str, vocab_size: Optional[int] = None) -> "BPETokenizer":
        lib = cls._library()
        tokenizer = lib.Tokenizer(lib.models.BPE())
        tokenizer.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = lib.decoders.ByteLevel()
        trainer = lib.trainers.BpeTrainer(vocab_size=vocab_size or 4096, show_progress=False,
                                          initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(text_chunks(text), trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        ids = [i for enc in self.tokenizer.encode_batch(list(text_chunks(text))) for i in enc.ids]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "json": self.tokenizer.to_str()}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "BPETokenizer":
        return cls(cls._library().Tokenizer.from_str(state["json"]))


#: tokenizers that `bigmodel prepare` trains on the corpus
TRAINED = {"char": CharTokenizer, "byte": ByteTokenizer, "bpe": BPETokenizer}
#: tokenizers made elsewhere, read from tokenizer.path (or, for gpt2, tiktoken's cache)
PRETRAINED = {"gpt2": GPT2Tokenizer, "hf": HFTokenizer}
TOKENIZERS = {**TRAINED, **PRETRAINED}
KINDS = ", ".join(TOKENIZERS)


def tokenizer_for_corpus(kind: str, vocab_size: Optional[int], path: Optional[str], corpus):
    """The tokenizer `bigmodel prepare` writes with: one made elsewhere, loaded from `path`
    (before the corpus is read, so a bad file fails at once), or one trained on `corpus()`."""
    if kind not in TOKENIZERS:
        raise UserError(f"tokenizer.kind={kind} is unknown; use tokenizer={KINDS.replace(', ', ', tokenizer=')}")
    if kind in PRETRAINED:
        if vocab_size is not None:
            raise UserError(f"tokenizer.vocab_size is for tokenizer=bpe; tokenizer={kind} has its own vocabulary")
        return PRETRAINED[kind].load(path), corpus()
    if path is not None:
        raise UserError(f"tokenizer.path is for tokenizer=gpt2 or tokenizer=hf; tokenizer={kind} is trained "
                        "on the corpus")
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"tokenizer.vocab_size must be > 0 (got {vocab_size})")
    text = corpus()
    return TRAINED[kind].fit(text, vocab_size), text


def tokenizer_problem(state: Any) -> Optional[str]:
    """What makes a stored tokenizer state (meta.json, a checkpoint) unusable, or None.
    Checked when the data is opened, so that `generate` never meets a broken one."""
    if not isinstance(state, dict):
        return f"it is a {type(state).__name__}, not a table"
    kind = state.get("kind")
    if kind not in TOKENIZERS:
        return f"unknown tokenizer kind {str(kind)[:40]!r}; expected {KINDS}"
    if kind == "char":
        return vocabulary_problem(state.get("vocab"))
    if kind == "bpe":
        return bpe_problem(state.get("json"))
    if kind == "gpt2":
        return gpt2_problem(state)
    if kind == "hf":
        return hf_problem(state)
    return None


def bpe_problem(text: Any) -> Optional[str]:
    """A BPE tokenizer must have the shape `bigmodel prepare` writes: byte-level BPE with no
    normalizer, post-processor, padding or truncation. The tokenizers library acts on what
    it is given (a padding of 10^12 aborts the process, some post-processors panic), so
    nothing else is handed to it."""
    try:
        parsed = json.loads(text)
    except (TypeError, ValueError):
        return "its BPE tokenizer is not JSON"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        return "its BPE tokenizer is not a JSON object with a model"
    unexpected = [key for key in ("normalizer", "post_processor", "padding", "truncation") if parsed.get(key)]
    shapes = {"model": "BPE", "pre_tokenizer": "ByteLevel", "decoder": "ByteLevel"}
    wrong = [key for key, kind in shapes.items() if (parsed.get(key) or {}).get("type") != kind]
    if unexpected or wrong or parsed.get("added_tokens"):
        return f"its BPE tokenizer is not the byte-level kind bigmodel prepare writes ({', '.join(unexpected + wrong)})"
    return None


def vocabulary_problem(vocab: Any) -> Optional[str]:
    if not isinstance(vocab, list) or not vocab:
        return "its character vocabulary is not a list of characters"
    if not all(isinstance(c, str) and len(c) == 1 for c in vocab) or len(set(vocab)) != len(vocab):
        return "its character vocabulary holds something other than distinct single characters"
    return None


def tokenizer_from_state(state: Optional[Dict[str, Any]], where: str = "the data's meta.json"):
    """The tokenizer a state describes (None for none); a UserError naming `where` if it is broken."""
    if not state:
        return None
    problem = tokenizer_problem(state)
    if problem:
        raise UserError(f"{where} is broken ({problem}); run bigmodel prepare again")
    kind = state["kind"]
    if kind == "char":
        return CharTokenizer(state["vocab"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer.from_state(state)
    if kind == "hf":
        return HFTokenizer.from_state(state, where)
    try:
        tokenizer = BPETokenizer.from_state(state)
        tokenizer.decode([int(i) for i in tokenizer.encode("a\n")])  # a trial run, before it is relied on
        return tokenizer
    except (UserError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # the tokenizers library's errors; a Rust panic is not an Exception
        raise UserError(f"{where} is broken (its BPE tokenizer does not work: {first_line(err)}); "
                        "run bigmodel prepare again") from None
