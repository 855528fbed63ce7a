"""One explanation run, top to bottom: the checkpoint's model and data, the examples, each
method's maps, the trust checks, then pictures and the report in the run dir."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from bigmodel_cli.build.inference import open_trained, ready_model
from bigmodel_cli.build.trained_inputs import checkpoint_tokenizer, eval_data
from bigmodel_cli.errors import UserError
from bigmodel_cli.explain import checks, methods
from bigmodel_cli.explain.examples import Examples, Predictions, background_inputs, from_prompt, from_split, predict
from bigmodel_cli.explain.spaces import Space, space_for

log = logging.getLogger("bigmodel")


@dataclass
class Maps:
    """One method's attributions for every example."""

    raw: torch.Tensor  # shaped like the attributed inputs
    features: np.ndarray  # (N, pixels | steps | tokens | features)
    groups: np.ndarray  # (N, groups): the level the checks compare at
    delta: Optional[torch.Tensor] = None  # integrated gradients' convergence deltas


@dataclass
class Explained:
    """Everything the pictures and the report are drawn from."""

    names: List[str]
    checkpoint: object  # the Checkpoint read (its path and step)
    model_name: str
    spec: object
    space: Space
    examples: Examples
    predictions: Predictions
    inputs: torch.Tensor  # the attributed inputs (token vectors for text)
    maps: Dict[str, Maps]
    tokens: Optional[List[List[str]]] = None  # each example's tokens as text (token data)
    decode: Callable[[int], str] = str  # an output index as text: the token (language models), else the index
    trust: Dict[str, object] = field(default_factory=dict)

    def target_text_of(self, index: int) -> str:
        return self.decode(index) if self.spec.task == "language_modeling" else str(index)

    @property
    def target_text(self) -> List[str]:
        """What each explanation is of: the target token, class or output, as text."""
        return [self.target_text_of(int(t)) for t in self.predictions.targets]


def method_names(cfg: DictConfig) -> List[str]:
    names = [str(m) for m in cfg.methods] if cfg.methods else [str(cfg.method)]
    if len(set(names)) != len(names):
        raise UserError(f"methods={names} names a method twice; name each once")
    return names


def attribute_all(name: str, space: Space, x: torch.Tensor, targets: torch.Tensor,
                  settings: methods.Settings) -> Maps:
    """One method over every example, `settings.batch_size` examples at a time."""
    raws, deltas = [], []
    for batch, batch_targets in zip(x.split(settings.batch_size), targets.split(settings.batch_size)):
        raw, delta = methods.attribute(name, space, batch, batch_targets, settings)
        raws.append(raw)
        deltas.append(delta)
    raw = torch.cat(raws)
    inputs = space.inputs(x[:1])[0]
    return Maps(raw, space.features(raw, inputs).cpu().numpy(), space.groups(raw, inputs).cpu().numpy(),
                torch.cat(deltas) if deltas[0] is not None else None)


def changed(space: Space, inputs: torch.Tensor, level: str) -> np.ndarray:
    """(N, features or groups) bool: where the input differs from its baseline."""
    differs = (inputs != space.baselines(inputs)).float()
    return getattr(space, level)(differs, inputs).cpu().numpy() > 0


def load(cfg: DictConfig, device: torch.device):
    """The checkpoint's model, ready on `device`, and its data, through eval's own loaders."""
    trained = open_trained(cfg.ckpt, cfg.trusted_targets, sections=("model", "data"))
    data, _ = eval_data(cfg, trained)
    model = ready_model(trained, device, data.spec)
    data.to(device)
    return trained, data, model


def choose_examples(cfg: DictConfig, trained, data, device: torch.device) -> Examples:
    spec = data.spec
    if cfg.prompt is None:
        return from_split(data, cfg.split, cfg.num_examples, cfg.batch_size or data.batch_size, spec.task)
    if spec.task != "language_modeling":
        raise UserError(f"prompt= is for language models, and {trained.checkpoint.path} is a {spec.task} model; "
                        f"leave prompt out to explain examples of the {cfg.split} split")
    return from_prompt(cfg.prompt, text_tokenizer(trained), spec.block_size, device)


def text_tokenizer(trained):
    """The checkpoint's own tokenizer (as generate finds it), or None where it has none."""
    try:
        return checkpoint_tokenizer(trained.checkpoint.data, None, trained.checkpoint.path)
    except UserError:
        return None


def decoder(tokenizer) -> Callable[[int], str]:
    """One token id as text (`#id` without a tokenizer)."""
    if tokenizer is None:
        return lambda i: f"#{i}"
    return lambda i: tokenizer.decode([i])


def run(cfg: DictConfig, device: torch.device) -> Explained:
    """Explain the chosen examples with each method, and check the maps."""
    names = method_names(cfg)
    trained, data, model = load(cfg, device)
    spec = data.spec
    model_name = trained.checkpoint.choices.get("model") or type(model).__name__
    examples = choose_examples(cfg, trained, data, device)
    batch_size = cfg.batch_size or data.batch_size
    background = background_inputs(data, batch_size)
    space = space_for(model, spec, background)
    methods.check_methods(names, space, model_name)
    predictions = predict(model, examples, spec.task, cfg.target, batch_size)
    settings = methods.Settings(cfg.n_steps, cfg.n_samples, batch_size)
    maps = {}
    for name in names:
        log.info("%s: %d examples", methods.METHODS[name].title, len(examples.x))
        torch.manual_seed(cfg.seed)  # LIME's, kernel SHAP's and gradient SHAP's samples
        maps[name] = attribute_all(name, space, examples.x, predictions.targets, settings)
    decode = decoder(text_tokenizer(trained)) if spec.input_kind == "tokens" else str
    tokens = [[decode(i) for i in row] for row in examples.x.tolist()] if spec.input_kind == "tokens" else None
    inputs = space.inputs(examples.x)[0].detach()
    explained = Explained(names, trained.checkpoint, model_name, spec, space, examples, predictions, inputs, maps, tokens, decode)
    explained.trust = trust(explained, cfg, settings, background)
    return explained


def trust(explained: Explained, cfg: DictConfig, settings: methods.Settings, background) -> Dict[str, object]:
    """Completeness, agreement and (unless sanity_check=false) model randomisation."""
    space, x, targets = explained.space, explained.examples.x, explained.predictions.targets
    compared = changed(space, explained.inputs, "groups")
    on_input = changed(space, explained.inputs, "features")
    out: Dict[str, object] = {
        "compared_groups": int(compared.sum()),
        "on_input": {name: checks.positive_share(m.features, on_input) for name, m in explained.maps.items()}}
    if "ig" in explained.maps:
        with torch.no_grad():
            at_baseline = space.forward(space.baselines(explained.inputs), *space.inputs(x)[1])
        gap = explained.predictions.target_scores - at_baseline.gather(1, targets[:, None])[:, 0]
        out["completeness"] = checks.completeness(explained.maps["ig"].delta, gap)
    groups = {name: m.groups for name, m in explained.maps.items()}
    out["agreement"] = checks.agreement(groups, compared)
    if cfg.sanity_check:
        log.info("model randomisation: the same maps for the re-initialised model")
        randomised_model = checks.randomised_copy(space.model, cfg.seed)
        randomised_space = space_for(randomised_model, explained.spec, background)
        randomised = {}
        for name in explained.names:
            torch.manual_seed(cfg.seed)
            randomised[name] = attribute_all(name, randomised_space, x, targets, settings).groups
        correlations = checks.randomisation(groups, randomised, compared)
        out["randomisation"] = checks.randomisation_verdict(correlations, out["agreement"])
    return out


def write_results(explained: Explained, cfg: DictConfig, run_dir: Path) -> Dict[str, object]:
    """explain.json, attributions.npz, the pictures, report.md (and HTML for steps and tokens)."""
    from bigmodel_cli.explain import pictures, report, text_view

    files = pictures.draw(explained, run_dir)
    if explained.spec.input_kind in ("tokens", "sequence"):
        files.append(text_view.write_html(explained, run_dir / "attributions.html"))
    np.savez_compressed(run_dir / "attributions.npz", **report.arrays(explained))
    files.append(run_dir / "attributions.npz")
    summary = report.summary(explained, cfg, files)
    report.write(summary, run_dir)
    return summary
