"""bigmodel against a hand-written PyTorch loop (bench/raw_loop.py) on the same work.

    python bench/run.py [--reps 3] [--steps 2000] [--cases gpt,mlp] [--malloc-tuned]
    python bench/run.py --allocator-study [--reps 9]

Runs A (bigmodel train) and B (the raw loop) interleaved, A B A B ..., in this one
session and environment, and prints a markdown table of medians: steady-state tokens/s
or steps/s (per 50-step interval, the first interval left out) and their ratio, time from
launch to the end of the first optimizer step, peak RSS, and the GPT's final validation
loss. Paste it into bench/RESULTS.md with the machine it ran on.

(a) gpt: char-level GPT on tinyshakespeare (../shared/data, or --data), block 64, 4
    layers, 4 heads, width 128, batch 12, AdamW lr 1e-3, dropout 0, clip 1.0, constant LR.
(b) mlp: 784-256-10 MLP, batch 64, Adam lr 1e-3, clip 1.0, synthetic data: the per-step
    overhead of the framework.
(c) gpt2 (CUDA GPU only, `--cases gpt2`): the gpt2 preset (124M, vocabulary 50304, block
    1024), batch 16, bf16, torch.compile, fused AdamW lr 6e-4, clip 1.0, on random tokens
    in a memory-mapped train.bin (throughput does not depend on the text). Also reports MFU,
    both sides by the same estimate (bigmodel_cli.telemetry.efficiency).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"

BIGMODEL_ARGS = {
    "gpt": ["model=gpt", "data=text", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
            "data.block_size=64", "data.batch_size=12", "optim=adamw", "optim.lr=1e-3", "scheduler=constant"],
    "mlp": ["model=mlp", "model.hidden_sizes=[256]", "model.dropout=0.0", "data=synthetic", "data.input_shape=[784]",
            "data.num_classes=10", "data.num_samples=4096", "data.batch_size=64", "optim=adam", "optim.lr=1e-3",
            "scheduler=constant"],
    "gpt2": ["model=gpt2", "model.dropout=0.0", "data=tokens", "data.vocab_size=50304", "data.block_size=1024",
             "data.batch_size=16", "optim=adamw", "optim.lr=6e-4", "scheduler=constant", "trainer.precision=bf16",
             "trainer.compile=true", "trainer.eval_batches=20"],
}
UNIT = {"gpt": "tokens_per_s", "gpt2": "tokens_per_s", "mlp": "samples_per_s"}
# Both sides run in this environment (--malloc-tuned adds the same glibc settings to both).
ENV = dict(os.environ)
# glibc returns freed blocks above these sizes to the OS at once, so a loop that allocates a
# few hundred KB per step pays page faults every step, depending on allocation history.
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
COMMON = ["trainer.grad_clip=1.0", "trainer.log_every=50", "trainer.val_at_start=false", "trainer.progress=plain",
          "logger=[jsonl]"]


def cold_compile_env(workdir: Path, base: dict) -> dict:
    """Every run compiles from scratch: a fresh Inductor and Triton cache each, so neither
    side's time to first step profits from the other's compiled kernels."""
    cache = workdir / f"compile-cache-{time.time_ns()}"
    return {**base, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}


def with_overrides(args, overrides) -> list:
    """`args` with each key=value of `overrides` replacing the same key's, or appended."""
    merged = dict(arg.split("=", 1) for arg in args)
    merged.update(arg.split("=", 1) for arg in overrides)
    return [f"{k}={v}" for k, v in merged.items()]


def run_bigmodel(case: str, steps: int, data: Path, workdir: Path, overrides=(), env=None) -> dict:
    run_dir = workdir / f"bigmodel-{case}-{time.time_ns()}"
    args = [*BIGMODEL_ARGS[case], *COMMON, f"trainer.max_steps={steps}", f"trainer.val_every={steps}",
            f"hydra.run.dir={run_dir}"]
    if case == "gpt":
        args.append(f"data.path={data}")
    if case == "gpt2":
        args.append(f"data.dir={workdir / 'gpt2-tokens'}")
    args = with_overrides(args, overrides)
    launched = time.time()
    subprocess.run([sys.executable, "-m", "bigmodel_cli", "train", *args], check=True, capture_output=True,
                   text=True, cwd=workdir, env=cold_compile_env(workdir, env or ENV))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    unit = UNIT[case]
    per_step = 64 if case == "mlp" else 1  # mlp: samples/s -> steps/s
    log_text = (run_dir / "train.log").read_text()
    first = float(re.search(r"first optimizer step done \(unix time ([0-9.]+)\)", log_text).group(1))
    val = next(r["val/loss"] for r in reversed(records) if "val/loss" in r)
    return {"rate": statistics.median(r[unit] / per_step for r in train[1:]), "first_step_s": first - launched,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in train), "val_loss": None if case == "gpt2" else val,
            "data_wait": statistics.median(r["data_wait"] for r in train[1:])}


def run_raw(case: str, steps: int, data: Path, workdir: Path, env=None) -> dict:
    if case == "gpt2":
        data = workdir / "gpt2-tokens"
    launched = time.time()
    done = subprocess.run([sys.executable, str(HERE / "raw_loop.py"), case, f"--steps={steps}", f"--data={data}"],
                          check=True, capture_output=True, text=True, env=cold_compile_env(workdir, env or ENV))
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rate": statistics.median(out["rates"][1:] or out["rates"]), "first_step_s": out["first_step_at"] - launched,
            "peak_mem_mb": out["peak_mem_mb"], "val_loss": out.get("val_loss"), "data_wait": None}


def write_random_tokens(folder: Path, vocab: int = 50257) -> None:
    """gpt2: 50M random GPT-2 token ids as train.bin (100 MB) and 1M as val.bin."""
    import numpy as np

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 50_000_000), ("val", 1_000_000)):
        rng.integers(0, vocab, count, dtype=np.uint16).tofile(folder / f"{split}.bin")


def gpt2_mfu(tokens_per_s: float) -> float:
    """The same MFU estimate that bigmodel logs, for either side's throughput."""
    import torch

    from bigmodel_cli.models.gpt import GPT
    from bigmodel_cli.telemetry.efficiency import peak_flops, transformer_flops_per_token

    with torch.device("meta"):
        model = GPT(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    n_params = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    peak = peak_flops(torch.device("cuda"), "bf16")
    return transformer_flops_per_token(n_params, 12, 768, 1024) * tokens_per_s / peak if peak else float("nan")


def allocator_study(reps: int, steps: int) -> None:
    """The mlp case four ways, interleaved: each side with glibc's default allocator
    settings and with MALLOC_TUNED. Says whether bigmodel should set them itself."""
    variants = [(impl, tuned) for impl in ("bigmodel", "raw") for tuned in (False, True)]
    rates = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for impl, tuned in variants:
                env = {**ENV, **MALLOC_TUNED} if tuned else ENV
                got = (run_bigmodel("mlp", steps, None, Path(tmp), env=env) if impl == "bigmodel"
                       else run_raw("mlp", steps, None, Path(tmp), env=env))
                rates[(impl, tuned)].append(got["rate"])
                print(f"rep {rep + 1} {impl} {'tuned' if tuned else 'default'}: {got['rate']:.0f}", file=sys.stderr,
                      flush=True)
    print(f"\nmlp steps/s, median of {reps} interleaved runs of {steps} steps ({os.cpu_count()} CPUs)\n")
    print("| side | default allocator | MALLOC_TUNED | tuned / default |")
    print("| --- | --- | --- | --- |")
    for impl in ("bigmodel", "raw"):
        plain, tuned = statistics.median(rates[(impl, False)]), statistics.median(rates[(impl, True)])
        print(f"| {impl} | {plain:,.0f} | {tuned:,.0f} | {tuned / plain:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cases", default="gpt,mlp")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--malloc-tuned", action="store_true", help="run both sides with " + " ".join(
        f"{k}={v}" for k, v in MALLOC_TUNED.items()))
    parser.add_argument("--allocator-study", action="store_true",
                        help="mlp only: both sides with and without the malloc settings")
    args = parser.parse_args()
    if args.allocator_study:
        return allocator_study(args.reps, args.steps)
    if args.malloc_tuned:
        ENV.update(MALLOC_TUNED)
    cases = args.cases.split(",")
    if "gpt" in cases and not args.data.is_file():
        sys.exit(f"the gpt case needs tinyshakespeare.txt: {args.data} is missing (pass --data)")
    if "gpt2" in cases and not __import__("torch").cuda.is_available():
        sys.exit("the gpt2 case needs a CUDA GPU")
    results = {(c, impl): [] for c in cases for impl in ("bigmodel", "raw")}
    with tempfile.TemporaryDirectory() as tmp:
        if "gpt2" in cases:
            write_random_tokens(Path(tmp) / "gpt2-tokens")
        for rep in range(args.reps):
            for case in cases:
                for impl in ("bigmodel", "raw"):  # A B, A B, ...
                    got = (run_bigmodel(case, args.steps, args.data, Path(tmp)) if impl == "bigmodel"
                           else run_raw(case, args.steps, args.data, Path(tmp)))
                    results[(case, impl)].append(got)
                    print(f"rep {rep + 1} {case} {impl}: {json.dumps(got)}", file=sys.stderr, flush=True)
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    torch = __import__("torch")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"\n{started}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, "
          f"median of {args.reps} interleaved runs of {args.steps} steps"
          f"{', glibc malloc tuned on both sides' if args.malloc_tuned else ''}\n")
    print("| case | metric | bigmodel | raw loop | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for case in cases:
        med = {impl: {k: statistics.median(r[k] for r in results[(case, impl)] if r[k] is not None)
                      for k in ("rate", "first_step_s", "peak_mem_mb")} for impl in ("bigmodel", "raw")}
        unit = "steps/s" if case == "mlp" else "tokens/s"
        a, b = med["bigmodel"], med["raw"]
        print(f"| {case} | {unit} | {a['rate']:,.0f} | {b['rate']:,.0f} | {a['rate'] / b['rate']:.3f} |")
        pairs = [x["rate"] / y["rate"] for x, y in zip(results[(case, "bigmodel")], results[(case, "raw")])]
        print(f"| {case} | {unit}, median of the per-pair ratios | | | {statistics.median(pairs):.3f} |")
        print(f"| {case} | time to first step (s) | {a['first_step_s']:.2f} | {b['first_step_s']:.2f} | "
              f"+{a['first_step_s'] - b['first_step_s']:.2f} s |")
        memory = "peak CUDA memory (MiB)" if case == "gpt2" else "peak RSS (MiB)"
        print(f"| {case} | {memory} | {a['peak_mem_mb']:,.0f} | {b['peak_mem_mb']:,.0f} | "
              f"{a['peak_mem_mb'] / b['peak_mem_mb']:.2f} |")
        wait = statistics.median(r["data_wait"] for r in results[(case, "bigmodel")])
        print(f"| {case} | data-wait share (bigmodel) | {100 * wait:.2f}% | | |")
        if case == "gpt2":
            print(f"| {case} | MFU | {gpt2_mfu(a['rate']):.1%} | {gpt2_mfu(b['rate']):.1%} | |")
        if case == "gpt":
            va = statistics.median(r["val_loss"] for r in results[(case, "bigmodel")])
            vb = statistics.median(r["val_loss"] for r in results[(case, "raw")])
            print(f"| {case} | final val loss | {va:.3f} | {vb:.3f} | {va - vb:+.3f} |")


if __name__ == "__main__":
    main()
