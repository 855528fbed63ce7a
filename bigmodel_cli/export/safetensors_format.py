"""format=safetensors: the weights, and a JSON record that rebuilds the model.

    model.safetensors   the weights (tensors only; a tied weight, GPT's LM head, stored once)
    bigmodel.json       what `bigmodel eval ckpt=<folder>` rebuilds the model and data from
                        (engine/exported.py reads it), and `model`: the class and the keyword
                        arguments that build it as a plain nn.Module:

        meta = json.load(open("out/bigmodel.json"))["model"]
        model = MLP(**meta["kwargs"])            # bigmodel_cli.models.mlp.MLP = meta["class"]
        safetensors.torch.load_model(model, "out/model.safetensors")
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import OmegaConf
from torch import nn

from bigmodel_cli.build.inference import TrainedModel
from bigmodel_cli.build.parts import accepted_kwargs, model_description
from bigmodel_cli.dotted_path import import_object
from bigmodel_cli.engine.exported import EXPORT_FORMAT, RECORD_FILE, WEIGHTS_FILE
from bigmodel_cli.export.format import Format, Runner


class Safetensors(Format):
    name = "safetensors"
    modules = ("safetensors",)
    check_modules = ("safetensors",)
    int8_why = "bigmodel.json rebuilds the model's fp32 class, whose layers cannot take int8 weights"

    def write(self, trained: TrainedModel, model: nn.Module, example: torch.Tensor, out: Path) -> List[str]:
        from safetensors.torch import save_model

        save_model(model, str(out / WEIGHTS_FILE))
        record = export_record(trained, model, saved_names(out / WEIGHTS_FILE))
        (out / RECORD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        return [WEIGHTS_FILE, RECORD_FILE]

    def runner(self, out: Path, trained: TrainedModel) -> Runner:
        """Built as the README's plain-nn.Module snippet builds it."""
        from safetensors.torch import load_model


        meta = json.loads((out / RECORD_FILE).read_text(encoding="utf-8"))["model"]
        model = import_object(trained.config.model._target_)(**meta["kwargs"])  # the vetted class
        load_model(model, str(out / WEIGHTS_FILE))
        return model.eval()


def saved_names(path: Path) -> List[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def tied_weights(model: nn.Module, saved: List[str]) -> Dict[str, str]:
    """Names left out of the file because they share a saved tensor's memory -> that name."""
    state = model.state_dict()
    by_memory = {(state[n].data_ptr(), tuple(state[n].shape)): n for n in saved}
    return {name: by_memory[(t.data_ptr(), tuple(t.shape))] for name, t in state.items() if name not in saved}


def export_record(trained: TrainedModel, model: nn.Module, saved: List[str]) -> Dict[str, Any]:
    """bigmodel.json: the checkpoint's record less its training state, plus the tied
    weights and the plain-nn.Module constructor."""
    checkpoint = trained.checkpoint
    spec = {**asdict(checkpoint.spec), "input_shape": list(checkpoint.spec.input_shape)}
    return {"format": EXPORT_FORMAT, "source": str(checkpoint.path.absolute()), "step": checkpoint.step,
            "epoch": checkpoint.epoch, "config": checkpoint.config, "choices": checkpoint.choices,
            "data": checkpoint.data, "spec": spec, "tied": tied_weights(model, saved),
            "model": {"class": trained.config.model._target_, "kwargs": constructor_kwargs(trained)}}


def constructor_kwargs(trained: TrainedModel) -> Dict[str, Any]:
    """The keyword arguments the model's class was built with: its config (less how-to-run
    keys) and the sizes the data implied."""
    cls = import_object(trained.config.model._target_)
    description = OmegaConf.to_container(model_description(trained.config.model, cls), resolve=False)
    kwargs = {k: v for k, v in description.items() if not k.startswith("_")}
    sizes = accepted_kwargs(cls, trained.checkpoint.spec.model_kwargs())
    return {**kwargs, **{k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}}
