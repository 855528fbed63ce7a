"""The inputs explained (the first examples of a split, or a prompt), the model's
predictions for them, and the output each explanation is of (`target=`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from bigmodel_cli.errors import UserError
from bigmodel_cli.explain.spaces import output_scores

#: training inputs drawn as gradient SHAP's background and the baselines' statistics
BACKGROUND_SIZE = 32


@dataclass
class Examples:
    x: torch.Tensor  # (N, ...) the model's inputs, on its device
    labels: Optional[torch.Tensor]  # (N,) the true class or next token (None for a prompt or regression)
    source: str  # "the first 16 of the test split", "the prompt"


@dataclass
class Predictions:
    targets: torch.Tensor  # (N,) the output index explained
    predicted: torch.Tensor  # (N,) argmax class / next token; for regression the output itself
    confidence: torch.Tensor  # (N,) softmax probability of the prediction (regression: nan)
    target_scores: torch.Tensor  # (N,) the explained output's score (logit or value)


def first_examples(data, split: str, count: int, batch_size: int) -> torch.Tensor:
    """The first `count` inputs and targets of a split, in order, through the data set's own
    evaluation batches (the same samples `bigmodel eval` reads)."""
    xs, ys, seen = [], [], 0
    for x, y in data.eval_batches(split, batch_size):
        xs.append(x)
        ys.append(y)
        seen += len(x)
        if seen >= count:
            return torch.cat(xs)[:count], torch.cat(ys)[:count]
    raise UserError(f"num_examples={count} is more than the {split} split's {seen} examples; "
                    f"use num_examples={seen} or fewer")


def from_split(data, split: str, count: int, batch_size: int, task: str) -> Examples:
    x, y = first_examples(data, split, count, batch_size)
    labels = None
    if task == "classification":
        labels = y
    elif task == "language_modeling":
        labels = y[:, -1]  # the token after each window's last position
    return Examples(x, labels, f"the first {count} of the {split} split")


def from_prompt(prompt: str, tokenizer, block_size: int, device: torch.device) -> Examples:
    """A prompt's tokens (its last block_size), whose next-token prediction is explained."""
    ids = [int(i) for i in tokenizer.encode(prompt)][-block_size:]
    if not ids:
        raise UserError("prompt is empty once tokenized; give some text, e.g. prompt=\"The \"")
    return Examples(torch.tensor([ids], dtype=torch.long, device=device), None, "the prompt")


def background_inputs(data, batch_size: int) -> torch.Tensor:
    """A sample of the training split's inputs."""
    x, _ = next(iter(data.eval_batches("train", max(batch_size, BACKGROUND_SIZE))))
    return x[:BACKGROUND_SIZE]


def parse_target(target) -> Union[str, int]:
    """'predicted', 'true' or the output index; anything else is one line. (Hydra reads
    target=true as a boolean, which a string key then holds as 'True'.)"""
    text = str(target)
    if text.lower() in ("predicted", "true"):
        return text.lower()
    try:
        return int(text)
    except ValueError:
        raise UserError(f"target={text} is neither predicted, true nor an output index; e.g. target=predicted "
                        "or target=3") from None


@torch.no_grad()
def predict(model, examples: Examples, task: str, target: str, batch_size: int) -> Predictions:
    """The model's predictions and the output index explained for each example."""
    scores = torch.cat([output_scores(model(x), task) for x in examples.x.split(batch_size)])
    target = parse_target(target)
    index = target if isinstance(target, int) else None
    if index is not None and not 0 <= index < scores.shape[1]:
        raise UserError(f"target={index} is not an output of this model (it has {scores.shape[1]}: 0 to "
                        f"{scores.shape[1] - 1})")
    if task == "regression":
        targets = torch.full((len(scores),), index or 0, dtype=torch.long, device=scores.device)
        value = scores.gather(1, targets[:, None])[:, 0]
        return Predictions(targets, value, torch.full_like(value, float("nan")), value)
    predicted = scores.argmax(1)
    confidence = scores.softmax(1).gather(1, predicted[:, None])[:, 0]
    if index is not None:
        targets = torch.full_like(predicted, index)
    elif target == "true":
        if examples.labels is None:
            raise UserError(f"target=true needs examples with labels, and {examples.source} has none; "
                            "use target=predicted or target=<output index>")
        targets = examples.labels
    else:
        targets = predicted
    return Predictions(targets, predicted, confidence, scores.gather(1, targets[:, None])[:, 0])


def as_list(values: torch.Tensor) -> List:
    return values.detach().cpu().tolist()
