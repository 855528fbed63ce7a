"""Checks of a composed config that types alone cannot express, one validator per config
group (the types and defaults: config.py; unknown keys: config_keys.py). Each failure is a
UserError naming the key and a fix."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.config import PIPELINE_SCHEDULES
from bigmodel_cli.config_keys import unknown_key, unknown_key_message
from bigmodel_cli.engine.threads import parse_threads
from bigmodel_cli.errors import UserError


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


# Seeds feed NumPy (32-bit) and derived seeds (seed x 1,000,003 + epoch): keep them 32-bit.
MAX_SEED = 2**32 - 1
# A collective that may wait longer than a week is a hang; timedelta and c10d overflow far above.
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600


def _in_range(cfg: DictConfig, dotted: str, low: float, high: float) -> None:
    value = OmegaConf.select(cfg, dotted)
    if value is not None:
        _require(low <= value <= high, f"{dotted} must be between {low:,} and {high:,} (got {value})")


def _positive(cfg: DictConfig, dotted: str, example: str) -> None:
    value = OmegaConf.select(cfg, dotted)
    if value is not None:
        _require(value > 0, f"{dotted} must be > 0 (got {value}); e.g. {dotted}={example}")


def validate_train_config(cfg: DictConfig) -> None:
    """Checks that types alone cannot express, one validator per config group; each
    failure names the key and a fix."""
    found = unknown_key("train", OmegaConf.to_container(cfg, resolve=False))
    _require(found is None, found and unknown_key_message(*found))
    missing = sorted(OmegaConf.missing_keys(cfg))
    _require(not missing, f"{', '.join(missing)} has no value (???); set it on the command line, "
                          f"e.g. {missing[0] if missing else ''}=...")
    validate_optim(cfg)
    validate_scheduler(cfg)
    validate_data_config(cfg.data)
    validate_trainer(cfg)
    validate_distill(cfg)


def validate_distill(cfg: DictConfig) -> None:
    temperature = OmegaConf.select(cfg, "distill.temperature")
    _require(temperature is None or temperature > 0,
             f"distill.temperature must be > 0 (got {temperature}); e.g. distill.temperature=4")
    alpha = OmegaConf.select(cfg, "distill.alpha")
    _require(alpha is None or 0 <= alpha <= 1, f"distill.alpha must be in [0, 1] (got {alpha}); e.g. distill.alpha=0.5")


def validate_optim(cfg: DictConfig) -> None:
    _positive(cfg, "optim.lr", "1e-3")
    decay = OmegaConf.select(cfg, "optim.weight_decay")
    _require(decay is None or decay >= 0, f"optim.weight_decay must be >= 0 (got {decay})")


def validate_scheduler(cfg: DictConfig) -> None:
    _positive(cfg, "scheduler.step_size", "500")
    _positive(cfg, "scheduler.gamma", "0.5")
    warmup = OmegaConf.select(cfg, "scheduler.warmup_steps")
    _require(warmup is None or warmup >= 0, f"scheduler.warmup_steps must be >= 0 (got {warmup})")
    ratio = OmegaConf.select(cfg, "scheduler.min_lr_ratio")
    _require(ratio is None or 0 <= ratio <= 1, f"scheduler.min_lr_ratio must be in [0, 1] (got {ratio})")
    _positive(cfg, "scheduler.T_max", "1000")  # (torch's own classes check the rest of their arguments)
    eta_min = OmegaConf.select(cfg, "scheduler.eta_min")
    _require(eta_min is None or eta_min >= 0, f"scheduler.eta_min must be >= 0 (got {eta_min}); e.g. scheduler.eta_min=1e-5")


def validate_trainer(cfg: DictConfig) -> None:
    for key, example in (("max_steps", "1000"), ("max_epochs", "10"), ("grad_accum_steps", "1"),
                         ("grad_clip", "1.0"), ("log_every", "50"), ("val_every", "250"), ("eval_batches", "50"),
                         ("devices", "2"), ("num_nodes", "1"), ("dist_timeout_s", "300"),
                         ("checkpoint_every", "500"), ("checkpoint_every_min", "30"), ("keep_last", "2")):
        _positive(cfg, f"trainer.{key}", example)
    _positive(cfg, "trainer.early_stopping.patience", "5")
    validate_parallel(cfg)
    delta = OmegaConf.select(cfg, "trainer.early_stopping.min_delta")
    _require(delta is None or delta >= 0, f"trainer.early_stopping.min_delta must be >= 0 (got {delta})")
    _in_range(cfg, "trainer.seed", 0, MAX_SEED)
    _in_range(cfg, "trainer.dist_timeout_s", 0, MAX_DIST_TIMEOUT_S)
    t = cfg.trainer
    _require(t.max_steps is not None or t.max_epochs is not None,
             "trainer.max_steps and trainer.max_epochs are both null; set one, "
             "e.g. trainer.max_steps=1000")
    _require(not (t.precision == "fp16" and t.strategy == "fsdp"),
             "trainer.precision=fp16 with trainer.strategy=fsdp is not supported (per-shard loss scaling "
             "would let ranks diverge); use trainer.precision=bf16")
    parse_threads(t.threads)
    resume = str(t.resume)
    _require(resume != "", "trainer.resume is empty; use auto, none or a checkpoint path")
    _require(t.init_from is None or resume in ("auto", "none"),
             "trainer.init_from and trainer.resume=<path> both name a starting point; use one of them")


def validate_parallel(cfg: DictConfig) -> None:
    for key, example in (("tp", "2"), ("pp", "2"), ("microbatches", "4")):
        _positive(cfg, f"trainer.parallel.{key}", example)
    schedule = OmegaConf.select(cfg, "trainer.parallel.schedule")
    _require(schedule is None or schedule in PIPELINE_SCHEDULES,
             f"unknown trainer.parallel.schedule={schedule}; use one of {', '.join(PIPELINE_SCHEDULES)}")


def validate_data_config(data: DictConfig) -> None:
    """The data section's values (train, and eval on a checkpoint's stored data config merged
    with the command line's)."""
    cfg = OmegaConf.create({"data": data})
    for key, example in (("batch_size", "64"), ("num_samples", "4096"), ("seq_len", "32"), ("block_size", "64")):
        _positive(cfg, f"data.{key}", example)
    _in_range(cfg, "data.seed", 0, MAX_SEED)
    for key in ("data.val_fraction", "data.test_fraction"):
        frac = OmegaConf.select(cfg, key)
        _require(frac is None or 0 < frac < 1, f"{key} must be between 0 and 1 (got {frac})")


#: the most steps a range test may take: it is a quick probe, not a training run
MAX_LR_FIND_STEPS = 10_000


def validate_lr_find(cfg: DictConfig) -> None:
    """The range test's own settings (bigmodel lr-find), each failure one line with a fix."""
    f = cfg.lr_find
    _require(f.min_lr > 0, f"lr_find.min_lr must be > 0 (got {f.min_lr}); e.g. lr_find.min_lr=1e-7")
    _require(math.isfinite(f.max_lr / f.min_lr), f"lr_find.max_lr / lr_find.min_lr must be a finite number (got "
                                                 f"{f.max_lr} / {f.min_lr}); e.g. lr_find.max_lr=10")
    _require(f.max_lr > f.min_lr, f"lr_find.max_lr ({f.max_lr}) must be above lr_find.min_lr ({f.min_lr}); "
                                  "e.g. lr_find.min_lr=1e-7 lr_find.max_lr=10")
    _require(2 <= f.num_steps <= MAX_LR_FIND_STEPS, f"lr_find.num_steps must be between 2 and "
                                                    f"{MAX_LR_FIND_STEPS:,} (got {f.num_steps}); e.g. lr_find.num_steps=100")
    _require(0 <= f.smoothing < 1, f"lr_find.smoothing must be in [0, 1) (got {f.smoothing}); e.g. lr_find.smoothing=0.9")
    _require(f.diverge_factor > 1, f"lr_find.diverge_factor must be > 1 (got {f.diverge_factor}); "
                                   "e.g. lr_find.diverge_factor=4")


COMPRESS_METHODS = ("prune", "quantize")
QUANTIZE_SCHEMES = ("auto", "dynamic", "weight_only")


def validate_compress_config(cfg: DictConfig) -> None:
    """bigmodel compress's own settings, each failure one line with a fix."""
    _require(not OmegaConf.is_missing(cfg, "ckpt"), "no checkpoint given; run bigmodel compress "
                                                    "ckpt=<checkpoint file or run dir> method=prune|quantize")
    _require(not OmegaConf.is_missing(cfg, "method"), "no method given; use method=prune or method=quantize")
    _require(cfg.method in COMPRESS_METHODS, f"unknown method {cfg.method!r}; use method=prune or method=quantize")
    _require(cfg.quantize.scheme in QUANTIZE_SCHEMES, f"unknown quantize.scheme {cfg.quantize.scheme!r}; "
                                                      "use auto, dynamic or weight_only")
    amount = cfg.prune.amount
    _require(0 < amount < 1, f"prune.amount must be between 0 and 1, exclusive (got {amount}); e.g. prune.amount=0.5")
    steps = cfg.prune.finetune_steps
    _require(steps >= 0, f"prune.finetune_steps must be >= 0 (got {steps}); e.g. prune.finetune_steps=200")
    _positive(cfg, "prune.finetune_lr", "1e-3")
    _require(cfg.split in ("train", "val", "test"), f"split must be train, val or test (got {cfg.split!r})")
    _require(cfg.latency_repeats > 0, f"latency_repeats must be > 0 (got {cfg.latency_repeats}); e.g. latency_repeats=30")
    _require(cfg.latency_warmup >= 0, f"latency_warmup must be >= 0 (got {cfg.latency_warmup}); e.g. latency_warmup=5")
    _require(cfg.threads > 0, f"threads must be > 0 (got {cfg.threads}); e.g. threads=1")
def validate_explain(cfg: DictConfig) -> None:
    """bigmodel explain's own settings, each failure one line with a fix."""
    _require(not OmegaConf.is_missing(cfg, "ckpt"), "no checkpoint given; run bigmodel explain ckpt=<checkpoint file "
                                                    "or run dir>")
    for key, example in (("num_examples", "16"), ("n_steps", "50"), ("n_samples", "200"), ("batch_size", "16")):
        _positive(cfg, key, example)
    _in_range(cfg, "seed", 0, MAX_SEED)
    _require(cfg.prompt is None or cfg.prompt != "", "prompt is empty; give the text whose next token to explain, "
                                                     "e.g. prompt=\"The \", or leave prompt out")
