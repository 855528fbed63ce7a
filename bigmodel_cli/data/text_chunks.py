"""A long text in pieces that tokenize exactly as the whole would."""

from __future__ import annotations

import re
from typing import Iterator

# A newline between two non-space characters: GPT-2-style pre-tokenizers (tiktoken's and
# the byte-level BPE's) always end a piece there, so cutting there changes no token. A
# cut after any newline would not do: "  \n" at a piece's end is one token, in the
# middle of a text two.
SAFE_CUT = re.compile(r"\S\n(?=\S)")


def text_chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Pieces of at least `size` characters (but the last), cut at safe line ends."""
    start = 0
    while start < len(text):
        cut = SAFE_CUT.search(text, start + size)
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end
