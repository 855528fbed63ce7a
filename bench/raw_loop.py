"""The baseline: a minimal hand-written PyTorch training loop, the way one writes it
without a framework (nanoGPT style). Same models (imported from bigmodel_cli so the
network is identical), same data split, batch, optimizer, schedule and clipping as the
bigmodel runs in bench/run.py; data loading and the loop are written out here.

Prints one JSON line: steady-state rates per 50-step interval, the wall-clock time when
the first optimizer step finished, peak RSS and (gpt) the final validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F


def param_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def gpt(args):
    from bigmodel_cli.models.gpt import GPT

    text = open(args.data, encoding="utf-8").read()
    vocab = sorted(set(text))
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = torch.from_numpy(lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)])
    n = len(ids)
    n_val, n_test = int(n * 0.05), int(n * 0.05)
    train, val = ids[:n - n_val - n_test], ids[n - n_val - n_test:n - n_test]
    block, batch = 64, 12
    torch.manual_seed(42)
    model = GPT(vocab_size=len(vocab), block_size=block, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    offsets = torch.arange(block + 1)

    def get_batch():
        starts = torch.randint(0, len(train) - block - 1 + 1, (batch,))
        window = train[starts[:, None] + offsets]
        return window[:, :-1], window[:, 1:]

    def step():
        x, y = get_batch()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    result = loop(step, args.steps, units_per_step=block * batch)

    @torch.no_grad()
    def val_loss():  # every non-overlapping window of the val split once
        model.eval()
        starts = torch.arange((len(val) - 1) // block) * block
        total, count = 0.0, 0
        for first in range(0, len(starts), batch):
            window = val[starts[first:first + batch, None] + offsets]
            logits = model(window[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += window[:, 1:].numel()
        return total / count

    result["val_loss"] = val_loss()
    return result


def gpt2(args):
    """GPT-2 small (124M) on a CUDA GPU, as nanoGPT trains it: token windows gathered from a
    memory-mapped train.bin, pinned and copied without blocking, bf16 autocast, TF32,
    torch.compile, fused AdamW."""
    from bigmodel_cli.models.gpt import GPT

    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high")
    tokens = np.memmap(f"{args.data}/train.bin", dtype=np.uint16, mode="r")
    block, batch = 1024, args.batch
    torch.manual_seed(42)
    model = GPT(vocab_size=50304, block_size=block, n_layer=12, n_head=12, n_embd=768, dropout=0.0).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=6e-4, betas=(0.9, 0.99), eps=1e-8, fused=True)
    compiled = torch.compile(model)
    window = np.arange(block + 1)

    def get_batch():
        starts = np.random.randint(0, len(tokens) - block - 1, batch)
        chunk = torch.from_numpy(tokens[starts[:, None] + window].astype(np.int64))
        chunk = chunk.pin_memory().to(device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]

    def step():
        x, y = get_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    result = loop(step, args.steps, units_per_step=block * batch)
    result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def mlp(args):
    from bigmodel_cli.models.mlp import MLP

    torch.manual_seed(42)
    x_all, y_all = torch.randn(4096, 784), torch.randint(0, 10, (4096,))
    model = MLP(input_shape=(784,), num_outputs=10, hidden_sizes=(256,), dropout=0.0)
    optimizer = torch.optim.Adam(param_groups(model, 0.0), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    batch = 64
    state = {"order": torch.randperm(len(x_all)), "i": 0}

    def step():
        if state["i"] + batch > len(x_all):
            state["order"], state["i"] = torch.randperm(len(x_all)), 0
        idx = state["order"][state["i"]:state["i"] + batch]
        state["i"] += batch
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return loop(step, args.steps, units_per_step=1)


def loop(step, steps, units_per_step, every=50):
    rates, first_step_at = [], None
    last = time.perf_counter()
    for i in range(1, steps + 1):
        loss = step()
        if i == 1:
            loss.item()
            first_step_at = time.time()
            last = time.perf_counter()
        elif i % every == 0:
            value = loss.item()  # the loop's one host sync per interval, as a logger would
            now = time.perf_counter()
            rates.append(units_per_step * (every if i > every else every - 1) / (now - last))
            last = now
            if not math.isfinite(value):
                raise SystemExit("loss diverged")
    return {"rates": rates, "first_step_at": first_step_at,
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["gpt", "mlp", "gpt2"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--data", help="tinyshakespeare.txt (gpt); a folder with train.bin (gpt2)")
    parser.add_argument("--batch", type=int, default=16, help="gpt2: sequences per step")
    args = parser.parse_args()
    print(json.dumps({"gpt": gpt, "mlp": mlp, "gpt2": gpt2}[args.case](args)))
