"""Tokenizers made elsewhere: GPT-2's (tiktoken) and any Hugging Face `tokenizer.json`.

Their stored state is plain data: GPT-2's is its name and the ranks file it was read
from (the file is found and its hash checked again when the state is loaded), a Hugging
Face tokenizer's is its JSON text. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bigmodel_cli.data.text_chunks import text_chunks
from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError, first_line

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_MAX_BYTES = 4 << 20  # the genuine file is 835,554 bytes
GPT2_VOCAB = 50257  # 50,256 byte-pair ranks and <|endoftext|>
# The split pattern of the GPT-2 release, in case tiktoken_ext no longer names it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
HF_MAX_BYTES = 256 << 20
FIX_GPT2 = ("give tokenizer.path=<gpt2.tiktoken>, the GPT-2 (r50k_base) ranks file, or set TIKTOKEN_CACHE_DIR "
            "to a tiktoken cache that holds the gpt2 encoding")


def read_bounded(path: Path, limit: int, key: str) -> bytes:
    if not path.is_file():
        raise UserError(f"{key}={path} does not exist or is not a file; give the tokenizer file's path")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{key}={path} is over {limit >> 20} MiB, larger than any tokenizer file of its kind")
    return data


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE (50,257 ids), as tiktoken and nanoGPT's GPT-2 prepare.py use it."""

    kind = "gpt2"
    vocab_size = GPT2_VOCAB

    def __init__(self, encoding, path: Optional[str] = None):
        self.encoding, self.path = encoding, path

    @classmethod
    def load(cls, path: Optional[str] = None) -> "GPT2Tokenizer":
        """From a local ranks file (hash checked), else from tiktoken's own cache or download."""
        try:
            import tiktoken
        except ImportError:
            raise UserError("tokenizer=gpt2 needs tiktoken: pip install 'bigmodel[tiktoken]'") from None
        if path is None:
            try:
                return cls(tiktoken.get_encoding("gpt2"))
            except Exception as err:  # no network and no cache: a requests or OS error
                raise UserError(f"tokenizer=gpt2 could not load tiktoken's GPT-2 encoding ({first_line(err)}); "
                                f"{FIX_GPT2}") from None
        file = user_path(path).absolute()
        data = read_bounded(file, GPT2_RANKS_MAX_BYTES, "tokenizer.path")
        digest = hashlib.sha256(data).hexdigest()
        if digest != GPT2_RANKS_SHA256:
            raise UserError(f"tokenizer.path={file} is not GPT-2's BPE ranks file (sha256 {digest[:12]}..., "
                            f"expected {GPT2_RANKS_SHA256[:12]}...); give the gpt2.tiktoken / r50k_base.tiktoken file")
        encoding = tiktoken.Encoding("gpt2", pat_str=gpt2_pattern(), mergeable_ranks=parse_ranks(data),
                                     special_tokens={"<|endoftext|>": GPT2_VOCAB - 1}, explicit_n_vocab=GPT2_VOCAB)
        return cls(encoding, str(file))

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "GPT2Tokenizer":
        """The ranks file the state names where it is still there, else tiktoken's own."""
        path = state.get("path")
        return cls.load(path if path and Path(path).is_file() else None)

    def encode(self, text: str) -> np.ndarray:
        parts = self.encoding.encode_ordinary_batch(list(text_chunks(text)))  # special tokens stay text
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] or [np.zeros(0, np.int64)])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; an id beyond GPT-2's (a model padded to 50,304) shows as U+FFFD."""
        pieces = [self.encoding.decode_single_token_bytes(i) if 0 <= i < GPT2_VOCAB else "\ufffd".encode()
                  for i in map(int, ids)]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "path": self.path}


def gpt2_pattern() -> str:
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return GPT2_PATTERN
    return r50k_pat_str


def parse_ranks(data: bytes) -> Dict[bytes, int]:
    """A .tiktoken file: one `<base64 token> <rank>` a line (its hash was checked first)."""
    import base64

    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def gpt2_problem(state: Dict[str, Any]) -> Optional[str]:
    path = state.get("path")
    return None if path is None or isinstance(path, str) else "its GPT-2 ranks path is not text"


class HFTokenizer:
    """Any Hugging Face `tokenizers` JSON file (tokenizer.json), used as it is."""

    kind = "hf"

    def __init__(self, tokenizer, chunked: bool = False):
        self.tokenizer, self.chunked = tokenizer, chunked

    @staticmethod
    def _library():
        try:
            import tokenizers
        except ImportError:
            raise UserError("tokenizer=hf needs the tokenizers package: pip install 'bigmodel[hf]' "
                            "(or pip install tokenizers)") from None
        return tokenizers

    @classmethod
    def load(cls, path: Optional[str]) -> "HFTokenizer":
        if not path:
            raise UserError("tokenizer=hf needs tokenizer.path=<tokenizer.json>, a Hugging Face tokenizers file")
        file = user_path(path)
        try:
            text = read_bounded(file, HF_MAX_BYTES, "tokenizer.path").decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"tokenizer.path={file} is not a tokenizer.json (not UTF-8 text); "
                            "give a Hugging Face tokenizers JSON file") from None
        return cls.from_json(text, f"tokenizer.path={file}")

    @classmethod
    def from_json(cls, text: Any, where: str) -> "HFTokenizer":
        """A UserError naming `where` unless `text` is a tokenizer that loads and round-trips."""
        parsed = hf_json(text)
        if isinstance(parsed, str):
            raise UserError(f"{where} is not a Hugging Face tokenizer ({parsed}); give a tokenizer.json file")
        # Padding and truncation are not used here, and the library acts on any value it is
        # given (a padding length of 10^12 aborts the process): they are dropped.
        parsed["padding"], parsed["truncation"] = None, None
        lib = cls._library()
        tokenizer = cls(guarded(lambda: lib.Tokenizer.from_str(json.dumps(parsed)), where), cuts_safely(parsed))
        tokenizer.decode([int(i) for i in tokenizer.encode("Hello world\n")])  # a trial run, before it is relied on
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids need not be contiguous once tokens are added)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str) -> np.ndarray:
        pieces = list(text_chunks(text)) if self.chunked else [text]
        encodings = guarded(lambda: self.tokenizer.encode_batch(pieces, add_special_tokens=False), "the tokenizer")
        return np.asarray([i for enc in encodings for i in enc.ids], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return guarded(lambda: self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False),
                       "the tokenizer")

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "json": self.tokenizer.to_str()}

    @classmethod
    def from_state(cls, state: Dict[str, Any], where: str) -> "HFTokenizer":
        return cls.from_json(state.get("json"), f"the Hugging Face tokenizer in {where}")


#: steps that treat every character (normalizers) or every whitespace-separated word
#: (pre-tokenizers) alike, wherever it stands: a text cut at a line end between words
#: tokenizes exactly as the whole. A SentencePiece-style "▁" prepended at a text's start
#: (Metaspace, Prepend) is not among them.
CUT_SAFE_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
CUT_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer"}


def cuts_safely(parsed: Dict[str, Any]) -> bool:
    """Whether a long text may be encoded in pieces (text_chunks) with the same ids; else
    it is encoded whole."""
    def steps(node: Any, key: str) -> List[str]:
        if node is None:
            return []
        if not isinstance(node, dict):
            return ["?"]
        inner = node.get(key)
        return [t for child in inner for t in steps(child, key)] if isinstance(inner, list) else [str(node.get("type"))]

    normalizers = steps(parsed.get("normalizer"), "normalizers")
    pre_tokenizers = steps(parsed.get("pre_tokenizer"), "pretokenizers")
    return (set(normalizers) <= CUT_SAFE_NORMALIZERS and bool(pre_tokenizers)
            and set(pre_tokenizers) <= CUT_SAFE_PRE_TOKENIZERS)


def hf_json(text: Any):
    """The parsed tokenizer JSON, or a string saying why it is not one."""
    try:
        parsed = json.loads(text)
    except (TypeError, ValueError):
        return "not JSON"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        return "not a JSON object with a model"
    if not isinstance(parsed["model"].get("type", "BPE"), str):
        return "its model has no type"
    return parsed


def hf_problem(state: Dict[str, Any]) -> Optional[str]:
    parsed = hf_json(state.get("json"))
    return f"its Hugging Face tokenizer is {parsed}" if isinstance(parsed, str) else None


def guarded(call, where: str):
    """`call()`, with the tokenizers library's failures as one line. It raises its own
    exceptions, and a Rust panic, which is not an Exception."""
    try:
        return call()
    except (UserError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:
        raise UserError(f"{where} does not work with the tokenizers library ({first_line(err)}); "
                        "give a tokenizer.json it can load") from None
