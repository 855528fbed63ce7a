"""`bigmodel prepare`: tokenize a corpus once into memory-mapped token files for data=tokens."""

from __future__ import annotations

from dataclasses import dataclass
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict

import hydra
from omegaconf import MISSING, DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_command_schema
from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError
from bigmodel_cli.error_report import report_user_errors

log = logging.getLogger("bigmodel")

# The config's schema (conf/prepare.yaml starts from it): each key's type, default and, in the
# comment on or above it, its `bigmodel prepare --help` description.


@dataclass
class PrepareConfig:
    out: str = MISSING  # the folder to write train.bin, val.bin, test.bin and meta.json into
    data: Any = None  # the data group (data=text): path, val_fraction, test_fraction
    tokenizer: Any = None  # the tokenizer group: char | byte | bpe | gpt2 | hf


SCHEMA = PrepareConfig
register_command_schema("prepare", SCHEMA)


def write_tokens(ids, path: Path, dtype) -> None:
    """The flat token array, written beside `path` and renamed over it when complete."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp")
    np.asarray(ids).astype(dtype).tofile(tmp)
    os.replace(tmp, path)


def prepare(cfg: DictConfig) -> Dict[str, Any]:
    import numpy as np

    from bigmodel_cli.data.text import builtin_corpus, read_corpus
    from bigmodel_cli.data.tokenizers import tokenizer_for_corpus
    from bigmodel_cli.data.tokens import META

    if OmegaConf.is_missing(cfg, "out"):
        raise UserError("no output folder given; run bigmodel prepare data.path=<corpus> out=<folder>")
    if cfg.data is None or "path" not in cfg.data:
        raise UserError("bigmodel prepare tokenizes text: use data=text data.path=<file or folder>")
    val, test = cfg.data.get("val_fraction", 0.05), cfg.data.get("test_fraction", 0.05)
    if not (0 < val < 1 and 0 <= test < 1 and val + test < 1):
        raise UserError(f"data.val_fraction={val} and data.test_fraction={test} must be fractions (val > 0, "
                        "test >= 0) that leave text to train on")
    path = cfg.data.get("path")
    tokenizer, text = tokenizer_for_corpus(cfg.tokenizer.kind, cfg.tokenizer.vocab_size, cfg.tokenizer.get("path"),
                                           lambda: builtin_corpus() if path is None else read_corpus(path))
    ids = tokenizer.encode(text)
    n = len(ids)
    n_val, n_test = int(n * val), int(n * test)
    n_train = n - n_val - n_test
    if min(n_train, n_val) < 2:
        raise UserError(f"{n:,} tokens are too few to split with data.val_fraction={val}; "
                        "use more text")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    out = user_path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file of that name, or no permission
        raise UserError(f"cannot use out={out} as the output folder ({err.strerror}); pick another out=") from None
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    for name, part in splits.items():
        if len(part):
            write_tokens(part, out / f"{name}.bin", dtype)
        else:  # no test split this time: an older test.bin must not pass for one
            (out / f"{name}.bin").unlink(missing_ok=True)
    meta = {"format": "bigmodel-tokens/1", "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
            "tokens": {k: int(len(v)) for k, v in splits.items()}, "source": str(path or "python docs"),
            "tokenizer": tokenizer.state_dict()}
    (out / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    log.info("%s tokenizer, vocabulary %d: %s tokens (train %s, val %s, test %s) as %s in %s",
             tokenizer.kind, tokenizer.vocab_size, f"{n:,}", f"{n_train:,}", f"{n_val:,}", f"{n_test:,}",
             meta["dtype"], out)
    log.info("next: bigmodel train model=gpt data=tokens data.dir=%s", out)
    return meta


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    report_user_errors(lambda: prepare(cfg))
