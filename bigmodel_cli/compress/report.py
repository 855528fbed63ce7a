"""compress.json (every number), report.md (the same, for people) and the console table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.compress.measure import Measurement

log = logging.getLogger("bigmodel")

Row = Tuple[str, str, str, str]  # what, before, after, change


def human_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def ratio(before: float, after: float) -> str:
    return f"{100 * after / before:.1f}% of before" if before else ""


def summary_rows(before: Measurement, after: Measurement, split: str, cfg: DictConfig) -> List[Row]:
    latency = (f"CPU latency per batch of {before.batch_size} (median of {cfg.latency_repeats}, "
               f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''})")
    rows: List[Row] = [
        ("parameters", f"{before.parameters:,}", f"{after.parameters:,}", ratio(before.parameters, after.parameters)),
        ("nonzero weights", f"{before.nonzero:,}", f"{after.nonzero:,}", ratio(before.nonzero, after.nonzero)),
        ("sparsity", f"{before.sparsity:.1%}", f"{after.sparsity:.1%}", ""),
        ("weights, serialized", human_bytes(before.weights_bytes), human_bytes(after.weights_bytes),
         ratio(before.weights_bytes, after.weights_bytes)),
        ("checkpoint file", human_bytes(before.file_bytes), human_bytes(after.file_bytes),
         ratio(before.file_bytes, after.file_bytes)),
        (latency, f"{before.latency_ms:.3f} ms", f"{after.latency_ms:.3f} ms", ratio(before.latency_ms, after.latency_ms)),
    ]
    for name, value in before.metrics.items():
        new = after.metrics.get(name, float("nan"))
        change = f"{new - value:+.4g}" + (f" ({100 * (new - value):+.2f} points)" if name == "accuracy" else "")
        rows.append((f"{split}/{name}", f"{value:.4f}", f"{new:.4f}", change))
    return rows


def layer_rows(before: Measurement, after: Measurement) -> List[str]:
    """One markdown row per layer: its kind, parameters and sparsity before and after."""
    new = {layer.name: layer for layer in after.layers}
    out = []
    for layer in before.layers:
        late = new.get(layer.name)
        kind = layer.kind if late is None or late.kind == layer.kind else f"{layer.kind} -> {late.kind}"
        shown = (f"{late.parameters:,}", f"{late.sparsity:.1%}") if late else ("removed", "")
        out.append(f"| `{layer.name}` | {kind} | {layer.parameters:,} | {shown[0]} | {layer.sparsity:.1%} | {shown[1]} |")
    return out


def describe_method(cfg: DictConfig, compressed) -> str:
    if cfg.method == "quantize":
        if compressed.compression["layers"][0]["scheme"] == "weight_only":
            return compressed.compression["scheme"]
        return (f"dynamic int8 quantization (torch.ao.quantization), Linear weights "
                f"{'per output channel' if cfg.quantize.per_channel else 'per matrix'}")
    p = cfg.prune
    kind = "structured: whole hidden units/channels removed" if p.structured else "global magnitude, unstructured"
    tuned = f", then {p.finetune_steps} fine-tune steps" if p.finetune_steps else ", no fine-tune"
    return f"pruning of {p.amount:.0%} ({kind}){tuned}"


def markdown(source: Path, output: Path, cfg: DictConfig, rows: List[Row], before: Measurement,
             after: Measurement, compressed) -> str:
    lines = ["# Compression report", "", f"- source: `{source}` (read only)", f"- compressed: `{output}` "
             f"(`bigmodel eval ckpt={output.parent.parent}` loads it)", f"- method: {describe_method(cfg, compressed)}", "",
             "| | before | after | change |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {what} | {old} | {new} | {change} |" for what, old, new, change in rows]
    lines += ["", "The checkpoint file before holds the optimizer state too; the compressed one holds none.",
              "After: measured on the compressed checkpoint as read back by the loader `bigmodel eval` uses."]
    if cfg.method == "prune" and not cfg.prune.structured:
        lines.append("Unstructured pruning stores its zeros densely: the file and the latency do not shrink "
                     "(prune.structured=true or method=quantize do).")
    if compressed.finetune:
        lines.append("Fine-tune, validation: " + ", ".join(f"{k} {v:.4f}" for k, v in compressed.finetune.items())
                     + " (curve in finetune/metrics.jsonl)")
    lines += ["", "## Layers", "", "| layer | kind | parameters before | after | sparsity before | after |",
              "| --- | --- | ---: | ---: | ---: | ---: |", *layer_rows(before, after)]
    if cfg.method == "quantize":
        lines += ["", "## Quantized layers", "", "| layer | scheme | scales | shares its weight with |",
                  "| --- | --- | --- | --- |", *quantized_rows(compressed.compression["layers"])]
    if compressed.kept:
        lines += ["", "## Left as they were", ""] + [f"- `{name}`: {why}" for name, why in compressed.kept.items()]
    return "\n".join(lines) + "\n"


SCHEME_LABELS = {"dynamic": "dynamic int8 (weights and activations)", "weight_only": "weight-only int8"}
SCALE_LABELS = {"per_channel": "one per output channel", "per_tensor": "one per matrix"}


def quantized_rows(entries: List[Dict[str, Any]]) -> List[str]:
    """One markdown row per int8 layer; a tied weight is quantized and stored once."""
    rows = []
    for entry in entries:
        tied = entry.get("tied_to")
        shared = f"`{tied}` (one int8 table and scales, stored once)" if tied else ""
        rows.append(f"| `{entry['name']}` | {SCHEME_LABELS[entry['scheme']]} | {SCALE_LABELS[entry['weights']]} "
                    f"| {shared} |")
    return rows


def print_table(rows: List[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(title, highlight=False, soft_wrap=True)
    table = Table()
    for name, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_report(run_dir: Path, cfg: DictConfig, source: Path, output: Path, before: Measurement,
                 after: Measurement, compressed) -> Dict[str, Any]:
    from bigmodel_cli.telemetry import write_json

    rows = summary_rows(before, after, cfg.split, cfg)
    summary = {"source": str(source.absolute()), "checkpoint": str(output.absolute()), "method": cfg.method,
               "settings": OmegaConf.to_container(cfg[cfg.method], resolve=True), "split": cfg.split,
               "before": before.as_dict(), "after": after.as_dict(), "kept": compressed.kept,
               "finetune": compressed.finetune, "quantized": compressed.compression.get("layers", []),
               "weights_ratio": after.weights_bytes / before.weights_bytes}
    write_json(run_dir / "compress.json", summary)
    (run_dir / "report.md").write_text(markdown(source, output, cfg, rows, before, after, compressed),
                                       encoding="utf-8")
    print_table(rows, f"{describe_method(cfg, compressed)} | {source}")
    print(f"compressed checkpoint: {output}\nreport: {run_dir / 'report.md'}", flush=True)
    return summary
