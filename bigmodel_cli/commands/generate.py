"""`bigmodel generate`: sample text from a trained language model, streamed to the console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List

import hydra
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_configs
from bigmodel_cli.errors import UserError, report_user_errors

log = logging.getLogger("bigmodel")
register_configs()


def load_language_model(ckpt: str, device):
    """The model and tokenizer a checkpoint was trained with (its config rebuilds it)."""
    from bigmodel_cli.build import build_model
    from bigmodel_cli.data.base import DataSpec
    from bigmodel_cli.data.tokenizers import CharTokenizer, tokenizer_from_state
    from bigmodel_cli.engine.checkpoint import load_checkpoint, load_sharded_model, resolve_checkpoint
    from bigmodel_cli.engine.device import use_tf32

    path = resolve_checkpoint(ckpt)
    state = load_checkpoint(path)
    spec_fields = dict(state.get("spec") or {})
    if spec_fields.get("task") != "language_modeling":
        raise UserError(f"{path} is not a language model (task {spec_fields.get('task')}); generate needs "
                        "one trained with data=text or data=tokens")
    spec_fields["input_shape"] = tuple(spec_fields["input_shape"])
    spec = DataSpec(**spec_fields)
    data_state = state.get("data") or {}
    tokenizer = (CharTokenizer(data_state["vocab"]) if data_state.get("vocab")
                 else tokenizer_from_state(data_state.get("tokenizer")))
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer (its token files had no meta.json); prepare the data "
                        "with bigmodel prepare to generate text")
    names = state.get("choices", {})
    config = OmegaConf.create(state["config"])
    model = build_model(config.model, spec, names.get("model", ""), names.get("data", ""))
    use_tf32(config.trainer.get("tf32", True), device)  # the matmul precision it trained with
    if "sharded_dir" in state:
        load_sharded_model(model, Path(state["sharded_dir"]))
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, spec, path


def start_token(tokenizer) -> List[int]:
    """What an empty prompt starts from: a newline where the vocabulary has one."""
    try:
        return [int(i) for i in tokenizer.encode("\n")][:1] or [0]
    except UserError:
        return [0]


def generate(cfg: DictConfig) -> List[str]:
    import torch

    from bigmodel_cli.engine.device import resolve_device
    from bigmodel_cli.engine.sampling import sample_tokens

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("no checkpoint given; run bigmodel generate ckpt=<run dir or checkpoint>")
    for key in ("max_new_tokens", "num_samples"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be >= 1 (got {cfg[key]})")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"top_k must be >= 1 or null (got {cfg.top_k})")
    device = resolve_device(cfg.device, key="device")
    model, tokenizer, spec, path = load_language_model(cfg.ckpt, device)
    prompt_ids = [int(i) for i in tokenizer.encode(cfg.prompt)] if cfg.prompt else start_token(tokenizer)
    hidden = 0 if cfg.prompt else len(prompt_ids)  # an empty prompt's start token is not shown
    log.info("sampling from %s (%s tokenizer, temperature %s, top_k %s)", path, tokenizer.kind,
             cfg.temperature, cfg.top_k)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = []
    for n in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {n + 1}", flush=True)
        ids = list(prompt_ids)
        shown = tokenizer.decode(ids[hidden:])
        print(shown, end="", flush=True)
        context = torch.tensor([ids], dtype=torch.long, device=device)
        for token in sample_tokens(model, context, cfg.max_new_tokens, spec.block_size, cfg.temperature,
                                   cfg.top_k, generator):
            ids.append(int(token[0]))
            text = tokenizer.decode(ids[hidden:])
            # Print what is new, once it is whole (a byte-level token may end mid-character).
            if text.startswith(shown) and not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
        print(flush=True)
        samples.append(tokenizer.decode(ids[hidden:]))
    sys.stdout.flush()
    return samples


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    report_user_errors(lambda: generate(cfg))
