"""What the integrity check costs when a checkpoint is loaded: `load_checkpoint(verify=True)`
(every byte checked against the CRC-32 it was written with; for a sharded folder, also
DCP's index and items vetted) against `verify=False`, on a checkpoint the size of gpt2's:
124M parameters with AdamW state, about 1.5 GB. Also the cost at save time of a sharded
checkpoint's digests (each rank reads back what it wrote).

    python bench/checkpoint_integrity.py [--repeats 5] [--dir /tmp]

Loads alternate verify / no-verify, so both see the same page cache (warm after the first
load: the figures are the CPU cost of the check, the disk read of a cold checkpoint comes
on top of both). Prints a markdown table of medians for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
import tempfile
import time
from pathlib import Path

import torch


def gpt2_training_state():
    """gpt2's weights and AdamW state after one step, plus the record a checkpoint holds."""
    from bigmodel_cli.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    record = {"step": 1, "epoch": 0.0, "config": {"model": {}, "data": {}, "trainer": {}}, "choices": {},
              "data": {}, "spec": {"task": "language_modeling", "input_kind": "tokens", "input_shape": [1024],
                                   "num_outputs": 50304, "vocab_size": 50304, "block_size": 1024},
              "best": {}, "scheduler": {}, "scaler": {}, "rng": [], "world_size": 1, "data_position": {}}
    return model, optimizer, record


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resume_from(path: Path, model, optimizer, verify: bool) -> None:
    """What a resume does with a checkpoint: read it, put weights and optimizer state in place."""
    from bigmodel_cli.engine.checkpoint import load_checkpoint, load_model_and_optimizer

    load_model_and_optimizer(model, optimizer, load_checkpoint(path, verify=verify))


def interleaved(path: Path, model, optimizer, repeats: int):
    resume_from(path, model, optimizer, verify=False)  # warm the page cache for both
    checked, unchecked = [], []
    for _ in range(repeats):
        checked.append(timed(lambda: resume_from(path, model, optimizer, verify=True)))
        unchecked.append(timed(lambda: resume_from(path, model, optimizer, verify=False)))
    return statistics.median(checked), statistics.median(unchecked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as meant

    from bigmodel_cli.engine.checkpoint import save_checkpoint
    from bigmodel_cli.engine.files import WORKERS, digests_of
    from bigmodel_cli.engine.sharded import save_sharded

    model, optimizer, record = gpt2_training_state()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        file = Path(tmp) / "gpt2.pt"
        save_checkpoint({**record, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, file)
        folder = Path(tmp) / "gpt2.dcp"
        save_sharded(record, model, optimizer, folder)
        shards = sorted(p.name for p in folder.iterdir() if p.name != "meta.pt")
        digest_s = statistics.median(timed(lambda: digests_of(folder, shards)) for _ in range(args.repeats))
        shard_gb = sum((folder / n).stat().st_size for n in shards) / 1e9
        rows = [("file (.pt)", file.stat().st_size / 1e9, *interleaved(file, model, optimizer, args.repeats)),
                ("sharded folder (.dcp)", shard_gb, *interleaved(folder, model, optimizer, args.repeats))]
    print(f"gpt2-sized checkpoint, torch {torch.__version__}, {WORKERS} CRC threads, median of {args.repeats} "
          "interleaved resumes (read, then weights and AdamW state into place), warm page cache\n")
    print("| checkpoint | size (GB) | resume, verified (s) | resume, unverified (s) | check costs | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, size, checked, unchecked in rows:
        print(f"| {name} | {size:.2f} | {checked:.2f} | {unchecked:.2f} | +{checked - unchecked:.2f} s | "
              f"{checked / unchecked:.2f} |")
    print(f"\nDigests at save time (sharded, each rank its own shards): {digest_s:.2f} s for {shard_gb:.2f} GB.")


if __name__ == "__main__":
    main()
