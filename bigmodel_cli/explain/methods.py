"""The attribution methods, Captum's implementations, run on one batch of examples.

Each returns attributions shaped like what its `Space` attributes (pixels, steps, token
vectors), and integrated gradients also Captum's convergence delta per example: the sum
of its attributions minus (score at the input - score at the baseline).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from bigmodel_cli.errors import UserError
from bigmodel_cli.explain.spaces import Space

#: the methods that need only the model's outputs, no gradients
PERTURBATION_METHODS = "method=occlusion, method=lime or method=kernel_shap"


@dataclass(frozen=True)
class Settings:
    n_steps: int  # integrated gradients' steps along the path from the baseline
    n_samples: int  # LIME and kernel SHAP: perturbed inputs per example; gradient SHAP: samples
    batch_size: int  # forwards of perturbed inputs (or IG steps) evaluated together


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    needs_gradients: bool
    run: Callable[[Space, torch.Tensor, tuple, torch.Tensor, Settings], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def integrated_gradients(space, inputs, extra, targets, settings):
    from captum.attr import IntegratedGradients

    return IntegratedGradients(space.forward).attribute(
        inputs, baselines=space.baselines(inputs), target=targets, additional_forward_args=extra or None,
        n_steps=settings.n_steps, internal_batch_size=settings.batch_size * len(inputs),
        return_convergence_delta=True)


def saliency(space, inputs, extra, targets, settings):
    from captum.attr import Saliency

    # The magnitude of the score's gradient: how much each value can move it.
    return Saliency(space.forward).attribute(inputs, target=targets, abs=True,
                                             additional_forward_args=extra or None), None


def gradient_shap(space, inputs, extra, targets, settings):
    from captum.attr import GradientShap

    return GradientShap(space.forward).attribute(
        inputs, baselines=space.background(inputs), n_samples=settings.n_samples, target=targets,
        additional_forward_args=extra or None), None


def occlusion(space, inputs, extra, targets, settings):
    from captum.attr import Occlusion

    window, strides = space.occlusion_window(inputs)
    return Occlusion(space.forward).attribute(
        inputs, sliding_window_shapes=window, strides=strides, baselines=space.baselines(inputs), target=targets,
        additional_forward_args=extra or None, perturbations_per_eval=settings.batch_size), None


def lime(space, inputs, extra, targets, settings):
    from captum.attr import Lime

    return surrogate(Lime(space.forward), space, inputs, extra, targets, settings)


def kernel_shap(space, inputs, extra, targets, settings):
    from captum.attr import KernelShap

    return surrogate(KernelShap(space.forward), space, inputs, extra, targets, settings)


def surrogate(explainer, space, inputs, extra, targets, settings):
    """LIME and kernel SHAP: a linear model over the feature groups, fitted per example."""
    with warnings.catch_warnings():  # "one example at a time is recommended": it loops over them itself
        warnings.simplefilter("ignore", UserWarning)
        return explainer.attribute(
            inputs, baselines=space.baselines(inputs), target=targets, additional_forward_args=extra or None,
            feature_mask=space.group_ids(inputs), n_samples=settings.n_samples,
            perturbations_per_eval=settings.batch_size), None


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("ig", "integrated gradients", True, integrated_gradients),
    Method("saliency", "saliency", True, saliency),
    Method("occlusion", "occlusion", False, occlusion),
    Method("lime", "LIME", False, lime),
    Method("kernel_shap", "kernel SHAP", False, kernel_shap),
    Method("gradient_shap", "gradient SHAP", True, gradient_shap),
)}


def check_methods(names: Sequence[str], space: Space, model_name: str) -> None:
    """Every method named exists and applies to this model, else one line saying why and
    which to use instead."""
    for name in names:
        if name not in METHODS:
            raise UserError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
        if METHODS[name].needs_gradients and not space.differentiable:
            raise UserError(f"method={name} cannot explain model={model_name}: it needs gradients through a token "
                            f"embedding, and the model has no nn.Embedding for its token ids; use "
                            f"{PERTURBATION_METHODS}, which only run the model")


def attribute(name: str, space: Space, x: torch.Tensor, targets: torch.Tensor,
              settings: Settings) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attributions of `targets`' scores for the batch `x` (and IG's convergence deltas)."""
    inputs, extra = space.inputs(x)
    with no_cudnn_rnn(inputs.device):
        attributions, delta = METHODS[name].run(space, inputs, extra, targets.tolist(), settings)
    return attributions.detach(), None if delta is None else delta.detach()


def no_cudnn_rnn(device: torch.device):
    """cuDNN's RNN kernels have no backward in eval mode: the gradient methods use torch's own."""
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()
