"""Per-token and per-step attributions as coloured text: in the console (rich) and as a
small standalone HTML file. Red is for the explained output, blue against it, each
example scaled to its own largest magnitude."""

from __future__ import annotations

import html
from pathlib import Path
from typing import List, Tuple

import numpy as np

#: examples shown in the console per method (the HTML file has them all)
CONSOLE_EXAMPLES = 4


def colour(value: float, limit: float) -> Tuple[int, int, int]:
    """White at 0, red at +limit, blue at -limit."""
    share = max(-1.0, min(1.0, value / limit)) if limit else 0.0
    fade = int(round(255 * (1 - abs(share))))
    return (255, fade, fade) if share >= 0 else (fade, fade, 255)


def pieces(explained, i: int, name: str) -> List[Tuple[str, float]]:
    """Example i as (text, attribution) per token or step."""
    values = explained.maps[name].features[i]
    if explained.tokens is not None:
        return list(zip(explained.tokens[i], values.tolist()))
    series = explained.examples.x[i].detach().cpu().float().reshape(len(values), -1)[:, 0]
    return [(f"{v:.2f} ", a) for v, a in zip(series.tolist(), values.tolist())]


def headline(explained, i: int) -> str:
    p = explained.predictions
    if explained.spec.task == "regression":
        return f"example {i}: predicted {float(p.predicted[i]):.4g}"
    return (f"example {i}: predicted {explained.target_text_of(int(p.predicted[i]))!r} "
            f"({float(p.confidence[i]):.0%}), explaining {explained.target_text[i]!r}")


def print_console(explained) -> None:
    from rich.console import Console
    from rich.text import Text

    from bigmodel_cli.explain.methods import METHODS

    console = Console(highlight=False, soft_wrap=True)
    shown = min(CONSOLE_EXAMPLES, len(explained.examples.x))
    for name in explained.names:
        console.print(f"[bold]{METHODS[name].title}[/bold]: red for the explained output, blue against "
                      f"(the first {shown} of {len(explained.examples.x)})")
        for i in range(shown):
            parts = pieces(explained, i, name)
            limit = float(np.abs([a for _, a in parts]).max()) or 1.0
            text = Text()
            for piece, value in parts:
                r, g, b = colour(value, limit)
                text.append(piece.replace("\n", "\u21b5"), style=f"black on rgb({r},{g},{b})")
            console.print(headline(explained, i))
            console.print(text)


def write_html(explained, out: Path) -> Path:
    from bigmodel_cli.explain.methods import METHODS

    body = []
    for name in explained.names:
        body.append(f"<h2>{html.escape(METHODS[name].title)}</h2>")
        for i in range(len(explained.examples.x)):
            parts = pieces(explained, i, name)
            limit = float(np.abs([a for _, a in parts]).max()) or 1.0
            spans = "".join(
                f'<span title="{value:.4g}" style="background:rgb{colour(value, limit)}">{html.escape(piece)}</span>'
                for piece, value in parts)
            body.append(f"<p class=head>{html.escape(headline(explained, i))}</p><pre>{spans}</pre>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>bigmodel explain: {html.escape(explained.model_name)}"
            "</title><style>body{font-family:sans-serif;max-width:60em;margin:1em auto}"
            "pre{white-space:pre-wrap;font-size:15px;line-height:1.6}.head{margin-bottom:0;color:#444}</style>"
            f"</head><body><h1>Why {html.escape(explained.model_name)} predicted what it did</h1>"
            "<p>Red: for the explained output; blue: against it (each example scaled to its largest value; "
            "hover for the number).</p>" + "\n".join(body) + "</body></html>\n")
    out.write_text(page, encoding="utf-8")
    return out
