"""Models from Hugging Face transformers: model=hf_causal_lm and model=hf_classifier.

Each builder returns the transformers model itself, no wrapper: the engine reads its
logits from the `ModelOutput` it returns (engine/logits.py), shards and checkpoints its
repeated blocks (its outermost ModuleList, e.g. GPT-2's `transformer.h`), and computes the
loss itself. What to build, `source`, is a model type of transformers' registry (`gpt2`,
`llama`, `bert`, ...), a config class (`GPT2Config`), or a local folder holding
`config.json` (and, with `pretrained=true`, the weights).

A randomly initialised model takes the sizes the data implies (vocabulary, context,
classes) and the small shape given (n_layer, n_head, n_embd). A pretrained one keeps its
shape; a vocabulary of another size resizes its embeddings. Nothing is ever downloaded
(`local_files_only`) and no code from a folder runs (`trust_remote_code=False`); weights
load with safetensors or `torch.load(weights_only=True)`.

transformers is imported only when a model is built: it is the optional extra `hf`.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError, first_line, root_cause

log = logging.getLogger("bigmodel")

INSTALL = "pip install 'bigmodel[hf]'"


def causal_lm(vocab_size: int, block_size: int, source: str = "gpt2", pretrained: bool = False,
              n_layer: int = 2, n_head: int = 2, n_embd: int = 64, config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A transformers causal LM (AutoModelForCausalLM) for next-token prediction."""
    sizes = {"vocab_size": vocab_size, "max_position_embeddings": block_size}
    return build("AutoModelForCausalLM", source, pretrained, (n_layer, n_head, n_embd), config, sizes)


def sequence_classifier(vocab_size: int, block_size: int, num_outputs: int, source: str = "bert",
                        pretrained: bool = False, n_layer: int = 2, n_head: int = 2, n_embd: int = 64,
                        config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A transformers sequence classifier (AutoModelForSequenceClassification), one label per
    token sequence."""
    sizes = {"vocab_size": vocab_size, "max_position_embeddings": block_size, "num_labels": num_outputs}
    # Padding is the data's last id (data=hf pads texts with it): GPT-2-style classifiers read
    # the last token before it, and BERT's padding embedding is that id's, not real token 0's.
    config = {"pad_token_id": vocab_size - 1, **(config or {})}
    return build("AutoModelForSequenceClassification", source, pretrained, (n_layer, n_head, n_embd), config, sizes)


# What the builders read and learn (bigmodel_cli/build/parts.py refuses other data before building).
causal_lm.input_kinds = ("tokens",)
causal_lm.tasks = ("language_modeling",)
sequence_classifier.input_kinds = ("tokens",)
sequence_classifier.tasks = ("classification",)


def build(auto_class: str, source: str, pretrained: bool, shape: tuple, settings: Optional[Dict[str, Any]],
          sizes: Dict[str, int]) -> nn.Module:
    auto = transformers_attr(auto_class)
    # (Hydra hands the nested node over as a DictConfig: transformers wants plain values.)
    settings = OmegaConf.to_container(settings) if isinstance(settings, DictConfig) else dict(settings or {})
    # Trained by bigmodel's loop, which feeds whole windows: no key/value cache to keep.
    settings.setdefault("use_cache", False)
    try:
        if pretrained:
            return from_folder(auto, source, settings, sizes)
        config = config_for(source, {**shape_settings(source, shape, settings, sizes["vocab_size"]), **settings,
                                     **sizes})
        return auto.from_config(config, trust_remote_code=False)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, AttributeError) as err:
        raise UserError(f"transformers could not build a model from model.source={source} "
                        f"({type(err).__name__}: {first_line(err)}); check model.source and model.config") from None


def shape_settings(source: str, shape: tuple, settings: Dict[str, Any], vocab_size: int) -> Dict[str, Any]:
    """n_layer, n_head, n_embd by the names every transformers config answers to, an MLP
    four times as wide (unless model.config says otherwise), and no token id beyond the
    vocabulary (GPT-2's 50256 is not a character id)."""
    n_layer, n_head, n_embd = shape
    out = {"num_hidden_layers": n_layer, "num_attention_heads": n_head, "hidden_size": n_embd}
    defaults = config_class_for(source)
    if defaults is not None:
        if hasattr(defaults, "intermediate_size") and "intermediate_size" not in settings:
            out["intermediate_size"] = 4 * n_embd
        if hasattr(defaults, "num_key_value_heads") and "num_key_value_heads" not in settings:
            out["num_key_value_heads"] = n_head
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            default = getattr(defaults, key, None)
            if isinstance(default, int) and default >= vocab_size and key not in settings:
                out[key] = None
    return out


def config_for(source: str, settings: Dict[str, Any]):
    """The transformers config for `source` (model type, config class or local folder)."""
    folder = local_folder(source)
    if folder is not None:
        auto_config = transformers_attr("AutoConfig")
        return auto_config.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **settings)
    cls = config_class_for(source)
    if cls is None:
        raise UserError(unknown_source(source))
    return cls(**settings)


def config_class_for(source: str):
    """The config class a model type or class name names; None for a folder or an unknown name."""
    if local_folder(source) is not None:
        return None
    name = source.removeprefix("transformers.")
    if name[:1].isupper():
        cls = getattr(transformers_module(), name, None) if name.endswith("Config") else None
        return cls if isinstance(cls, type) else None
    types = model_types()
    return types[name] if name in types else None


def model_types():
    """transformers' registry: model type ('gpt2') -> its config class."""
    transformers_module()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING


def unknown_source(source: str) -> str:
    names = list(model_types().keys())
    close = difflib.get_close_matches(source, names, n=1)
    hint = f"did you mean model.source={close[0]}? " if close else ""
    return (f"model.source={source} is neither a transformers model type, a config class (e.g. GPT2Config) nor a "
            f"local folder with config.json; {hint}model types include gpt2, llama, bert, ...")


def local_folder(source: str):
    """`source` as a folder, when it names one (a path, or a name with a '/' in it)."""
    path = user_path(source)
    if path.is_dir():
        return path
    if "/" in source or source.startswith((".", "~")):
        raise UserError(f"model.source={source} is not a folder (bigmodel never downloads models); "
                        "give a local folder with config.json, or a model type such as gpt2")
    return None


def from_folder(auto, source: str, settings: Dict[str, Any], sizes: Dict[str, int]) -> nn.Module:
    """The pretrained model in a local folder, fitted to the data's vocabulary and context."""
    folder = local_folder(source)
    if folder is None:
        raise UserError(f"model.pretrained=true needs model.source to be a local folder with config.json and "
                        f"the weights (got {source}); bigmodel never downloads models")
    extra = {"num_labels": sizes["num_labels"]} if "num_labels" in sizes else {}
    try:
        model = auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                     weights_only=True, **settings, **extra)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never do that
        raise UserError(f"the weights in {folder} are refused: loading them would run code (a pickle "
                        "beyond tensors); use model.safetensors weights, or a folder whose weights are "
                        "plain tensors") from None
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and sizes["max_position_embeddings"] > limit:
        raise UserError(f"data.block_size={sizes['max_position_embeddings']} is longer than the {limit} positions "
                        f"the model in {folder} has; use data.block_size={limit} or less")
    vocab = sizes["vocab_size"]
    if model.get_input_embeddings().num_embeddings != vocab:
        log.info("resizing the token embeddings of %s from %d to the data's vocabulary of %d", folder,
                 model.get_input_embeddings().num_embeddings, vocab)
        model.resize_token_embeddings(vocab)
    return model


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError(f"model=hf_causal_lm and model=hf_classifier need Hugging Face transformers: {INSTALL}") from None
    return transformers


def transformers_attr(name: str):
    """transformers.<name>, imported now (transformers imports lazily): a broken dependency of
    transformers (a torchvision built for another torch, say) is one line naming it."""
    module = transformers_module()
    try:
        return getattr(module, name)
    except Exception as err:  # transformers wraps the real failure; its cause says what it was
        raise UserError(f"transformers is installed but cannot import {name} ({root_cause(err)}); repair or reinstall it and its dependencies, e.g. {INSTALL} "
                        "(a torchvision built for another torch breaks it: reinstall or uninstall torchvision)") from None
