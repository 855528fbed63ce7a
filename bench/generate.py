"""`bigmodel generate`'s sampling: GPT's KV cache against the full recompute, and against
transformers' `generate` on the same weights.

    python bench/generate.py [--reps 5] [--new-tokens 256] [--train-steps 300] [--threads 1]

Trains the shipped `model=gpt` (4 layers, 4 heads, width 128) briefly on `data=text` (the
Python docs, characters) with data.block_size=256, so that a one-character prompt and 256
new tokens fit in one context; loads it as `bigmodel generate` does. Then, interleaved
A B C D A B C D ..., times the sampling of --new-tokens tokens (the sample loop of
engine/sampling.py, one sequence):

- bigmodel, kv_cache=true and kv_cache=false, seeded sampling (temperature 0.8, top_k 50:
  generate's defaults); the two must give the same tokens (asserted);
- bigmodel kv_cache=true and transformers' GPT2LMHeadModel.generate (its own KV cache),
  greedy, on the same weights copied into GPT-2's layout (the logits are checked to match
  first); the tokens must be the same (asserted);
- with --window 64 too: the same model sampled with a 64-token window (data=text's default
  block_size), where past 64 tokens every step recomputes the window whichever path runs.

Prints the medians, the ratios (and the median of the per-round ratios), and a markdown
block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from bigmodel_cli.commands.generate import load_language_model
from bigmodel_cli.engine.sampling import sample_tokens

SAMPLED = {"temperature": 0.8, "top_k": 50}
GREEDY = {"temperature": 0.0, "top_k": None}


def train_char_gpt(steps: int, workdir: Path) -> Path:
    run_dir = workdir / "gpt"
    args = ["model=gpt", "data=text", "data.block_size=256", f"trainer.max_steps={steps}",
            f"trainer.val_every={steps}", "trainer.eval_batches=2", "trainer.progress=plain", "logger=[jsonl]",
            f"hydra.run.dir={run_dir}"]
    subprocess.run([sys.executable, "-m", "bigmodel_cli", "train", *args], check=True, capture_output=True,
                   text=True, cwd=workdir)
    return run_dir


def import_gpt2():
    """transformers' GPT-2 classes. A torchvision wheel built for another torch (as on a
    CPU-only torch with PyPI's torchvision) breaks transformers' import of its image helpers,
    which GPT-2 never uses: then transformers is told torchvision is absent."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except (ImportError, RuntimeError):
        import transformers.utils as utils
        import transformers.utils.import_utils as import_utils

        import_utils.is_torchvision_available = utils.is_torchvision_available = lambda: False
        from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2Config, GPT2LMHeadModel


def as_gpt2(model):
    """A transformers GPT2LMHeadModel with `model`'s weights (bigmodel's GPT: the same
    architecture; GPT-2's Conv1D keeps its matrices transposed)."""
    GPT2Config, GPT2LMHeadModel = import_gpt2()
    attn = model.blocks[0].attn
    config = GPT2Config(vocab_size=model.tok_emb.num_embeddings, n_positions=model.block_size,
                        n_embd=model.tok_emb.embedding_dim, n_layer=len(model.blocks), n_head=attn.n_heads,
                        activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    weights = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
               "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):
        ours = {"ln_1": block.ln_1, "ln_2": block.ln_2, "attn.c_attn": block.attn.qkv,
                "attn.c_proj": block.attn.proj, "mlp.c_fc": block.mlp.fc, "mlp.c_proj": block.mlp.proj}
        for name, module in ours.items():
            transposed = name != "ln_1" and name != "ln_2"
            weights[f"transformer.h.{i}.{name}.weight"] = module.weight.T if transposed else module.weight
            weights[f"transformer.h.{i}.{name}.bias"] = module.bias
    hf = GPT2LMHeadModel(config).eval()
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=False)
    assert not unexpected and missing == ["lm_head.weight"], (missing, unexpected)  # tied to wte
    hf.tie_weights()
    return hf


def check_same_logits(model, hf, vocab: int) -> float:
    idx = torch.randint(0, vocab, (2, model.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (hf(idx).logits - model(idx)).abs().max().item()
    assert gap < 1e-4, f"GPT-2's logits differ from bigmodel's by {gap}"
    return gap


def bigmodel_sample(model, prompt, new_tokens: int, window: int, kv_cache: bool, settings: dict):
    generator = torch.Generator().manual_seed(1337)
    start = time.perf_counter()
    tokens = [int(t[0]) for t in sample_tokens(model, prompt, new_tokens, window, settings["temperature"],
                                               settings["top_k"], generator, kv_cache=kv_cache)]
    return time.perf_counter() - start, tokens


def hf_greedy(hf, prompt, new_tokens: int):
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start, out[0, prompt.shape[1]:].tolist()


def variants(model, hf, prompt, args) -> dict:
    """Label -> () -> (seconds, tokens). Pairs that must agree share a `same` tag."""
    n, block = args.new_tokens, model.block_size
    out = {
        "bigmodel sampled, KV cache": lambda: bigmodel_sample(model, prompt, n, block, True, SAMPLED),
        "bigmodel sampled, recompute": lambda: bigmodel_sample(model, prompt, n, block, False, SAMPLED),
        "bigmodel greedy, KV cache": lambda: bigmodel_sample(model, prompt, n, block, True, GREEDY),
        "transformers generate greedy": lambda: hf_greedy(hf, prompt, n),
    }
    if args.window:
        w = args.window
        out[f"bigmodel sampled, KV cache, window {w}"] = lambda: bigmodel_sample(model, prompt, n, w, True, SAMPLED)
        out[f"bigmodel sampled, recompute, window {w}"] = lambda: bigmodel_sample(model, prompt, n, w, False, SAMPLED)
    return out


SAME = [("bigmodel sampled, KV cache", "bigmodel sampled, recompute"),
        ("bigmodel greedy, KV cache", "transformers generate greedy")]


def measure(runs: dict, reps: int) -> dict:
    seconds = {label: [] for label in runs}
    tokens = {}
    for label, run in runs.items():  # a warm-up round, not timed
        tokens[label] = run()[1]
    pairs = SAME + [(a, a.replace("KV cache", "recompute")) for a in runs if "window" in a and "KV" in a]
    for a, b in pairs:
        assert tokens[a] == tokens[b], f"{a} and {b} sampled different tokens"
    for rep in range(reps):
        for label, run in runs.items():
            took, again = run()
            assert again == tokens[label], f"{label} is not deterministic"
            seconds[label].append(took)
        print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in seconds.items()), file=sys.stderr)
    return seconds


def report(seconds: dict, args, logit_gap: float, sample: str) -> None:
    n = args.new_tokens
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"\n{started}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"median of {args.reps} interleaved rounds of {n} new tokens, one sequence "
          f"(`python bench/generate.py --reps {args.reps} --new-tokens {n} --train-steps {args.train_steps} "
          f"--threads {args.threads}{f' --window {args.window}' if args.window else ''}`); GPT-2's logits "
          f"on the copied weights within {logit_gap:.1e} of bigmodel's\n")
    print("| sampling | tokens/s | vs recompute (sampled) | per-round ratio |")
    print("| --- | --- | --- | --- |")
    base = seconds["bigmodel sampled, recompute"]
    for label, runs in seconds.items():
        reference = seconds[label.replace("KV cache", "recompute")] if "window" in label else base
        ratio = statistics.median(reference) / statistics.median(runs)
        per_round = statistics.median(r / s for r, s in zip(reference, runs))
        print(f"| {label} | {n / statistics.median(runs):,.0f} | {ratio:.2f}x | {per_round:.2f}x |")
    cached = statistics.median(seconds["bigmodel greedy, KV cache"])
    hf = statistics.median(seconds["transformers generate greedy"])
    print(f"\nbigmodel (KV cache) / transformers generate, greedy: {hf / cached:.2f}x the tokens/s")
    print(f"\nthe sampled text (KV cache and recompute alike): {sample!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=300, help="1: (nearly) the random initial weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the sampling")
    parser.add_argument("--window", type=int, default=64, help="also sample with this context window (0: not)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, _, _ = load_language_model(str(train_char_gpt(args.train_steps, Path(tmp))),
                                                     torch.device("cpu"))
    if args.new_tokens > model.block_size:  # the one-token prompt and all but the last new token are fed
        sys.exit(f"--new-tokens must be at most the model's block_size ({model.block_size})")
    hf = as_gpt2(model)
    gap = check_same_logits(model, hf, model.tok_emb.num_embeddings)
    prompt = torch.tensor([[int(i) for i in tokenizer.encode("\n")]], dtype=torch.long)
    runs = variants(model, hf, prompt, args)
    seconds = measure(runs, args.reps)
    sample = tokenizer.decode(runs["bigmodel sampled, KV cache"]()[1])
    report(seconds, args, gap, sample[:120])


if __name__ == "__main__":
    main()
