"""GPT-2's BPE ranks file (gpt2.tiktoken) for the tokenizer=gpt2 tests, without network.

tiktoken downloads it from OpenAI's blob store, which tests and CI cannot reach; the same
file ships inside the openai-whisper sdist on PyPI, which pip can fetch. Found, in order:
$BIGMODEL_GPT2_TIKTOKEN; a copy cached in ~/.cache/bigmodel-test; the sdist, downloaded
once with pip and unpacked into that cache. Every copy's sha256 is checked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Tuple

SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SDIST = "openai-whisper==20250625"
MEMBER = "whisper/assets/gpt2.tiktoken"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigmodel-test"


def genuine(path: Path) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == SHA256


def find_gpt2_ranks() -> Tuple[Optional[Path], str]:
    """(the file, "") or (None, why it could not be had)."""
    given = os.environ.get("BIGMODEL_GPT2_TIKTOKEN")
    if given:
        return (Path(given), "") if genuine(Path(given)) else (None, f"BIGMODEL_GPT2_TIKTOKEN={given} is not "
                                                                     "GPT-2's ranks file (sha256 differs)")
    cached = CACHE / "gpt2.tiktoken"
    if genuine(cached):
        return cached, ""
    try:
        data = download_ranks()
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as err:
        return None, f"could not get gpt2.tiktoken from {SDIST} ({err}); set BIGMODEL_GPT2_TIKTOKEN=<its path>"
    if isinstance(data, str):
        return None, data
    if hashlib.sha256(data).hexdigest() != SHA256:
        return None, f"{SDIST} holds no genuine {MEMBER}; set BIGMODEL_GPT2_TIKTOKEN=<path of gpt2.tiktoken>"
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, cached)  # whole or absent, should two sessions fetch it at once
    return cached, ""


def download_ranks():
    """The file's bytes from the sdist pip downloads, or a string saying why there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                              "-d", tmp], capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if pip.returncode != 0 or not sdists:
            return (f"could not download {SDIST} with pip to get gpt2.tiktoken "
                    f"({(pip.stderr.strip().splitlines() or ['no output'])[-1]}); "
                    "set BIGMODEL_GPT2_TIKTOKEN=<path of gpt2.tiktoken>")
        with tarfile.open(sdists[0]) as sdist:
            member = next((m for m in sdist.getmembers() if m.name.endswith(MEMBER) and m.isfile()), None)
            return sdist.extractfile(member).read() if member else b""
