"""`bigmodel compress`: prune or int8-quantize a checkpoint into a new run dir (bigmodel_cli/compress/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_command_schema
from bigmodel_cli.error_report import report_user_errors


# The config's schema (conf/compress.yaml starts from it): each key's type, default and, in the
# comment on or above it, its `bigmodel compress --help` description.


@dataclass
class PruneConfig:
    # Share removed, in (0, 1): of all weights (unstructured), or of each hidden layer's units
    # or channels (structured).
    amount: float = 0.5
    # true: remove whole hidden units/channels, so the layers really shrink (model=mlp, cnn);
    # false: zero the smallest weights across the model (global magnitude pruning).
    structured: bool = False
    finetune_steps: int = 0  # optimizer steps on the checkpoint's own training data after pruning (0: none)
    finetune_lr: Optional[float] = None  # learning rate of that fine-tune (null: the checkpoint's optim.lr)


@dataclass
class QuantizeConfig:
    # One scale per output channel of each Linear (more accurate); false: one per matrix.
    per_channel: bool = True
    skip: List[str] = field(default_factory=list)  # module names to keep in fp32, e.g. [head]
    # auto: weight-only int8 for language models (gpt, hf_causal_lm), dynamic int8 for the
    # others; dynamic: int8 weights and activations (Linear/LSTM/GRU); weight_only: int8
    # weights with a scale per output channel, float activations (Linear and a tied embedding).
    scheme: str = "auto"


@dataclass
class CompressConfig:
    ckpt: str = MISSING  # the run dir (its best checkpoint, else last) or checkpoint file to compress
    method: str = MISSING  # prune | quantize
    prune: PruneConfig = field(default_factory=PruneConfig)  # settings of method=prune
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)  # settings of method=quantize
    split: str = "test"  # the split whose metric is reported before and after: train | val | test
    latency_repeats: int = 30  # timed batches whose median is the CPU latency
    latency_warmup: int = 5  # untimed batches before them
    threads: int = 1  # CPU threads for the latency measurement and fine-tune
    # Import paths outside bigmodel that the checkpoint's stored config may name (its own
    # model or data class, say): trusted_targets=[mypkg.nets.MyNet]. Others are refused.
    trusted_targets: List[str] = field(default_factory=list)


SCHEMA = CompressConfig
register_command_schema("compress", SCHEMA)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compress")
def main(cfg: DictConfig) -> Dict[str, Any]:
    from bigmodel_cli.compress.pipeline import compress_checkpoint

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return report_user_errors(lambda: compress_checkpoint(cfg, run_dir), run_dir=run_dir)
