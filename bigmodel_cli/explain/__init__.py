"""`bigmodel explain`: why a trained model predicted what it did, and how far to trust it.

One module per job: `spaces` (what is attributed for each data kind: pixels, time steps,
token embeddings, with their baselines and feature groups), `methods` (Captum's
attribution methods), `examples` (the inputs and targets explained), `checks`
(completeness, model randomisation, agreement), `pictures` (PNGs), `text_view` (coloured
console text and HTML), `report` (explain.json and report.md) and `session`, which runs
them in order. Captum is the optional extra `explain`.
"""

from __future__ import annotations

from bigmodel_cli.errors import UserError

INSTALL = "pip install 'bigmodel[explain]'"


def require_captum() -> None:
    """Captum importable, else the one line saying how to install it."""
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        raise UserError(f"bigmodel explain needs Captum: {INSTALL}") from None
