"""`bigmodel generate`: sample text from a trained language model, streamed to the console."""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
import math
import sys
from typing import Any, List, Optional

import hydra
from omegaconf import MISSING, DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_command_schema
from bigmodel_cli.error_report import report_user_errors
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

# The config's schema (conf/generate.yaml starts from it): each key's type, default and, in the
# comment on or above it, its `bigmodel generate --help` description.


@dataclass
class GenerateConfig:
    ckpt: str = MISSING  # the run dir or checkpoint file to sample from
    # Import paths outside bigmodel that the checkpoint's stored config may name (its own
    # model class, say): trusted_targets=[mypkg.nets.MyNet]. Others are refused.
    trusted_targets: List[str] = field(default_factory=list)
    prompt: str = ""  # text the samples continue
    max_new_tokens: int = 200  # tokens generated per sample
    temperature: float = 0.8  # sampling temperature (0: greedy)
    top_k: Optional[int] = 50  # sample among the k likeliest tokens only (null: all)
    num_samples: int = 1  # samples to print
    seed: int = 1337  # fixes the samples (all num_samples together: they are drawn as one batch)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    kv_cache: bool = True  # reuse the keys and values of earlier tokens (false: recompute; same samples)
    # The tokenizer group, for a checkpoint without one (a nanoGPT GPT-2 folder's run):
    # tokenizer=gpt2, or tokenizer=hf tokenizer.path=<tokenizer.json>. null: the checkpoint's.
    tokenizer: Any = None


SCHEMA = GenerateConfig
register_command_schema("generate", SCHEMA)


def load_language_model(ckpt: str, device, trusted_targets=(), tokenizer_override=None):
    """The model and tokenizer a checkpoint was trained with (its config rebuilds it)."""
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.build.trained_inputs import checkpoint_tokenizer  # (torch: not before argv is parsed)

    trained = open_trained(ckpt, trusted_targets)
    path, spec = trained.checkpoint.path, trained.checkpoint.spec
    if spec.task != "language_modeling":
        raise UserError(f"{path} is not a language model (task {spec.task}); generate needs "
                        "one trained with data=text or data=tokens")
    tokenizer = checkpoint_tokenizer(trained.checkpoint.data, tokenizer_override, path)
    if tokenizer.vocab_size > spec.vocab_size:
        raise UserError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size:,} token ids but the model in "
                        f"{path} only {spec.vocab_size:,}; use the tokenizer its training data was made with")
    return ready_model(trained, device), tokenizer, spec, path


def start_token(tokenizer) -> List[int]:
    """What an empty prompt starts from: a newline where the vocabulary has one."""
    try:
        return [int(i) for i in tokenizer.encode("\n")][:1] or [0]
    except UserError:
        return [0]


def check_settings(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("no checkpoint given; run bigmodel generate ckpt=<run dir or checkpoint>")
    for key in ("max_new_tokens", "num_samples"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be >= 1 (got {cfg[key]})")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"top_k must be >= 1 or null (got {cfg.top_k})")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise UserError(f"temperature must be a number >= 0 (got {cfg.temperature}); 0 is greedy, e.g. temperature=0.8")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"seed must be between 0 and {2**63 - 1} (got {cfg.seed})")


def generate(cfg: DictConfig) -> List[str]:
    """Sample num_samples continuations of the prompt, all in one batch: one sample is
    streamed as it grows; several are printed whole, each under a `--- sample N` line."""
    import torch

    from bigmodel_cli.engine.device import resolve_device
    from bigmodel_cli.engine.sampling import sample_tokens

    check_settings(cfg)
    device = resolve_device(cfg.device, key="device")
    model, tokenizer, spec, path = load_language_model(cfg.ckpt, device, cfg.trusted_targets, cfg.tokenizer)
    prompt_ids = [int(i) for i in tokenizer.encode(cfg.prompt)] if cfg.prompt else start_token(tokenizer)
    hidden = 0 if cfg.prompt else len(prompt_ids)  # an empty prompt's start token is not shown
    log.info("sampling from %s (%s tokenizer, temperature %s, top_k %s)", path, tokenizer.kind,
             cfg.temperature, cfg.top_k)
    # One generator for the batch: a seed fixes the whole set of samples (num_samples=1 the one).
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    context = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)
    tokens = sample_tokens(model, context, cfg.max_new_tokens, spec.block_size, cfg.temperature, cfg.top_k,
                           generator, kv_cache=cfg.kv_cache)
    rows = [list(prompt_ids) for _ in range(cfg.num_samples)]
    if cfg.num_samples == 1:
        stream(tokens, rows[0], tokenizer, hidden)
    else:
        for step in tokens:
            for row, token in zip(rows, step.tolist()):
                row.append(token)
        for n, row in enumerate(rows):
            print(f"--- sample {n + 1}\n{tokenizer.decode(row[hidden:])}", flush=True)
    sys.stdout.flush()
    return [tokenizer.decode(row[hidden:]) for row in rows]


def stream(tokens, ids: List[int], tokenizer, hidden: int) -> None:
    """Print one sample as its tokens come, appending them to `ids`."""
    shown = tokenizer.decode(ids[hidden:])
    print(shown, end="", flush=True)
    for token in tokens:
        ids.append(int(token[0]))
        text = tokenizer.decode(ids[hidden:])
        # Print what is new, once it is whole (a byte-level token may end mid-character).
        if text.startswith(shown) and not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    report_user_errors(lambda: generate(cfg))
