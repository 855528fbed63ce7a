"""What a checkpoint says of its inputs, for the commands that read one (eval, generate,
explain): its data, with a command's overrides that do not re-split it, and its tokenizer."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.build.parts import build_data
from bigmodel_cli.config_checks import validate_data_config
from bigmodel_cli.data.tokenizers import CharTokenizer, PRETRAINED, tokenizer_from_state
from bigmodel_cli.errors import UserError

# Data keys that decide which samples land in which split: changing one at eval time would
# let training samples into the split being evaluated.
SPLIT_KEYS = ("seed", "val_fraction", "test_fraction", "num_samples")


def eval_data(cfg: DictConfig, trained):
    """The checkpoint's data, with this command's data overrides (never ones that re-split it)."""
    stored = trained.config.data
    changed = [k for k in SPLIT_KEYS if k in cfg.data and cfg.data[k] != stored.get(k)]
    if changed:
        raise UserError(f"data.{changed[0]} would re-split the data, mixing training samples into the "
                        f"{cfg.split} split; evaluate with the checkpoint's own split settings")
    data_cfg = OmegaConf.merge(stored, cfg.data)
    if cfg.batch_size is not None:
        data_cfg.batch_size = cfg.batch_size
    validate_data_config(data_cfg)
    return build_data(data_cfg, trained.checkpoint.data), data_cfg


def checkpoint_tokenizer(data_state: dict, override, path):
    """The checkpoint's own tokenizer, or the one given (tokenizer=gpt2|hf) where it has none
    or the same kind (its ranks file or tokenizer.json found elsewhere)."""
    stored = data_state.get("tokenizer") or {}
    stored_kind = "char" if data_state.get("vocab") else stored.get("kind")
    if override is not None:
        if override.kind not in PRETRAINED:
            raise UserError(f"generate takes tokenizer=gpt2 or tokenizer=hf, not tokenizer={override.kind}: a "
                            f"{override.kind} tokenizer comes with the checkpoint it was trained for")
        if stored_kind not in (None, override.kind):
            raise UserError(f"{path} was trained with a {stored_kind} tokenizer, not {override.kind}; "
                            "leave tokenizer= out to use its own")
        return PRETRAINED[override.kind].load(override.get("path"))
    if data_state.get("vocab"):
        return CharTokenizer.from_vocab(data_state["vocab"], f"the vocabulary in {path}")
    tokenizer = tokenizer_from_state(data_state.get("tokenizer"), f"the tokenizer in {path}")
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer (its token files had no meta.json or meta.pkl); give the one "
                        "its tokens were made with: tokenizer=gpt2 (nanoGPT's GPT-2 folders) or tokenizer=hf "
                        "tokenizer.path=<tokenizer.json>, or prepare the data with bigmodel prepare")
    return tokenizer
