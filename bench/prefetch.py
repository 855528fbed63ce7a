"""Does background prefetch (data.prefetch) help? bigmodel train on data=tokens with
data.prefetch=0 and =2, interleaved, on random token ids in a memory-mapped train.bin.

    python bench/prefetch.py [--preset gpt2|small] [--reps 2] [--steps 300] [--cold-cache]

gpt2: the bench/run.py gpt2 case (124M, bf16, compile; GPU-bound on a GPU).
small: the 4-layer, 128-wide GPT of the gpt case (block 64, batch 12, fp32, no compile):
on a GPU its steps are short enough that host-side work is what limits it.
--cold-cache: a 4 GB train.bin, and the page cache dropped before every run (Linux, root),
so each window is read from disk as with a corpus larger than RAM.
Prints median tokens/s and data-wait share per setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from run import run_bigmodel, write_random_tokens

PRESETS = {
    "gpt2": [],
    "small": ["model=gpt", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "data.block_size=64",
              "data.batch_size=12", "trainer.precision=fp32", "trainer.compile=false"],
}


def write_large_tokens(folder: Path, gigabytes: int = 4) -> None:
    """Random ids, written in 256 MB pieces (never all in memory)."""
    rng = np.random.default_rng(1)
    with open(folder / "train.bin", "wb") as f:
        for _ in range(gigabytes * 4):
            rng.integers(0, 50257, 2**27, dtype=np.uint16).tofile(f)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cold-cache", action="store_true")
    parser.add_argument("--dir", help="where the token files go (a disk, not tmpfs, for --cold-cache)")
    args = parser.parse_args()
    if args.cold_cache and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        parser.error("--cold-cache drops the page cache: it needs Linux and root")
    depths = (0, 2)
    got = {d: [] for d in depths}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        write_random_tokens(Path(tmp) / "gpt2-tokens")
        if args.cold_cache:
            write_large_tokens(Path(tmp) / "gpt2-tokens")
        for _ in range(args.reps):
            for depth in depths:
                if args.cold_cache:
                    drop_page_cache()
                overrides = [*PRESETS[args.preset], f"data.prefetch={depth}", f"trainer.device={args.device}"]
                got[depth].append(run_bigmodel("gpt2", args.steps, Path(tmp), Path(tmp), overrides))
    cache = ", 4 GB train.bin read with a cold page cache" if args.cold_cache else ""
    print(f"\n{args.preset}{cache}, median of {args.reps} interleaved runs of {args.steps} steps\n")
    print("| data.prefetch | tokens/s | data-wait share |")
    print("| --- | --- | --- |")
    for depth in depths:
        rate = statistics.median(r["rate"] for r in got[depth])
        wait = statistics.median(r["data_wait"] for r in got[depth])
        print(f"| {depth} | {rate:,.0f} | {100 * wait:.2f}% |")


if __name__ == "__main__":
    main()
