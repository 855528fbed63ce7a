"""Every command, declared once: its name, the module whose `main` runs it, its one-line
summary, and whether it is a Hydra app (plot and summary take plain arguments).

The CLI's usage and dispatch, the pre-flight check, `<command> --help` and the key check
derive what they need from this table and from the command's own module, which holds its
config's schema (`SCHEMA`, registered in Hydra's ConfigStore when the module is imported) or,
for the commands that take train's groups, their top-level `KEYS`. A new command is then a
line here, its module and its conf/<name>.yaml (docs/contributing.md).

Standard library only: `bigmodel --help` reads it without importing Hydra or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Command:
    module: str  # holds the command's `main`
    summary: str  # its line in `bigmodel --help`
    hydra: bool = True  # a Hydra app with conf/<config name>.yaml


COMMANDS: Dict[str, Command] = {
    "train": Command("bigmodel_cli.commands.train", "Train a model; writes a run dir with logs, metrics and checkpoints."),
    "eval": Command("bigmodel_cli.commands.eval", "Evaluate a checkpoint (ckpt=<file or run dir>) on a data split."),
    "prepare": Command("bigmodel_cli.commands.prepare",
                       "Tokenize a text corpus into memory-mapped token files (data=tokens)."),
    "generate": Command("bigmodel_cli.commands.generate", "Sample text from a trained language model (ckpt=<run dir>)."),
    "plot": Command("bigmodel_cli.commands.plot", "Plot loss, metric and lr curves of run dirs, overlaid (one PNG).",
                    hydra=False),
    "summary": Command("bigmodel_cli.commands.summary",
                       "Table of a sweep's jobs, best first; summary.csv/.json, sweep.png.", hydra=False),
    "plan": Command("bigmodel_cli.commands.plan",
                    "Memory per rank, steps, FLOPs and launch command of a train config; trains nothing."),
    "lr-find": Command("bigmodel_cli.commands.lr_find", "LR range test on train's model and data; prints an optim.lr to use."),
    "compress": Command("bigmodel_cli.commands.compress",
                        "Prune or int8-quantize a checkpoint (ckpt=<run dir>); a report of before/after."),
    "export": Command("bigmodel_cli.commands.export",
                      "Write a checkpoint as safetensors, TorchScript, ONNX or a Hugging Face folder."),
    "explain": Command("bigmodel_cli.commands.explain",
                       "Why a checkpoint predicted what it did: attribution maps, LIME, SHAP."),
}


def config_name(command: str) -> str:
    """The name of a command's primary config: `lr-find` -> lr_find (conf/lr_find.yaml)."""
    return command.replace("-", "_")
