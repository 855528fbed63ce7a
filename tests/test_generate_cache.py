"""Sampling with GPT's KV cache gives the tokens of the full recompute, and `bigmodel
generate` draws its num_samples as one batch."""

from types import SimpleNamespace

import pytest
import torch

import bigmodel_cli.commands.generate as generate_command
from bigmodel_cli.data.tokenizers import CharTokenizer
from bigmodel_cli.engine.sampling import sample_tokens
from bigmodel_cli.models.gpt import GPT
from conftest import compose_config


BLOCK = 16


def tiny_gpt(vocab: int = 40) -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab, BLOCK, n_layer=2, n_head=2, n_embd=32).eval()
    with torch.no_grad():  # sharper logits than the init's near-uniform ones: a real choice per step
        model.tok_emb.weight.mul_(4)
    return model


class Spy(torch.nn.Module):
    """The model, counting the calls of each path and the batch sizes it was given."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, idx):
        self.calls.append(("full", idx.shape[0]))
        return self.model(idx)

    def new_kv_cache(self, batch_size):
        return self.model.new_kv_cache(batch_size)

    def forward_cached(self, idx, cache):
        self.calls.append(("cached", idx.shape[0]))
        return self.model.forward_cached(idx, cache)


def sample(model, context, steps, temperature, top_k, kv_cache):
    generator = torch.Generator().manual_seed(7)
    return torch.stack(list(sample_tokens(model, context, steps, BLOCK, temperature, top_k, generator,
                                          kv_cache=kv_cache)), dim=1)


@pytest.mark.unit
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 5)])
@pytest.mark.parametrize("prompt_length", [3, BLOCK + 4])  # inside the window, and already past it
def test_cached_sampling_gives_the_tokens_of_the_full_recompute(temperature, top_k, prompt_length):
    model = Spy(tiny_gpt())
    context = torch.randint(0, 40, (3, prompt_length), generator=torch.Generator().manual_seed(1))
    steps = 2 * BLOCK  # well past block_size: the window slides
    cached = sample(model, context, steps, temperature, top_k, kv_cache=True)
    used = [kind for kind, _ in model.calls]
    model.calls.clear()
    recomputed = sample(model, context, steps, temperature, top_k, kv_cache=False)
    assert torch.equal(cached, recomputed)
    assert {kind for kind, _ in model.calls} == {"full"}
    # The cache served every step until the sequence outgrew block_size, the full forward after.
    inside = max(0, BLOCK - prompt_length + 1)
    assert used == ["cached"] * inside + ["full"] * (steps - inside)
    if temperature > 0:  # the seed matters: another one gives other samples
        generator = torch.Generator().manual_seed(8)
        other = torch.stack(list(sample_tokens(model, context, steps, BLOCK, temperature, top_k, generator)), 1)
        assert not torch.equal(other, cached)


@pytest.mark.unit
def test_cached_logits_match_the_training_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 40, (2, BLOCK))
    cache = model.new_kv_cache(2)
    prefix = model.forward_cached(idx[:, :5], cache)
    steps = [model.forward_cached(idx[:, i:i + 1], cache) for i in range(5, BLOCK)]
    full = model(idx)
    assert torch.equal(prefix, model(idx[:, :5]))  # a fresh prompt is the training forward itself
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full)
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(idx[:, :1], cache)


def run_generate(monkeypatch, capsys, *overrides):
    """`bigmodel generate` in-process on a tiny GPT; returns (samples, stdout, the model's calls)."""
    tokenizer = CharTokenizer.fit("abcdefghijklmnopqrstuvwxyz .,\n" * 3, 300)
    model = Spy(tiny_gpt(tokenizer.vocab_size))
    spec = SimpleNamespace(block_size=BLOCK)
    monkeypatch.setattr(generate_command, "load_language_model",
                        lambda ckpt, device, trusted=(), chosen=None: (model, tokenizer, spec, "tiny"))
    cfg = compose_config("ckpt=tiny", "device=cpu", "prompt=ab", *overrides, config_name="generate")
    samples = generate_command.generate(cfg)
    return samples, capsys.readouterr().out, model.calls


@pytest.mark.unit
def test_generate_draws_all_samples_in_one_batch(monkeypatch, capsys):
    samples, out, calls = run_generate(monkeypatch, capsys, "num_samples=3", "max_new_tokens=24")
    assert len(samples) == 3 and len(set(samples)) > 1 and all(s.startswith("ab") for s in samples)
    assert {batch for _, batch in calls} == {3} and len(calls) == 24  # one batch of 3 per token
    assert out.count("--- sample ") == 3 and all(s in out for s in samples)
    # The switch changes the path, never the samples.
    again, _, calls = run_generate(monkeypatch, capsys, "num_samples=3", "max_new_tokens=24", "kv_cache=false")
    assert again == samples and {kind for kind, _ in calls} == {"full"}


@pytest.mark.unit
def test_greedy_samples_of_a_batch_are_each_the_single_greedy_sample(monkeypatch, capsys):
    batch, _, _ = run_generate(monkeypatch, capsys, "num_samples=2", "temperature=0", "max_new_tokens=30")
    single, out, _ = run_generate(monkeypatch, capsys, "num_samples=1", "temperature=0", "max_new_tokens=30")
    assert batch == single * 2 and out.strip() == single[0].strip() and "--- sample" not in out


@pytest.mark.e2e
def test_the_generation_benchmark_runs_and_its_paths_agree(tmp_path):
    """bench/generate.py asserts identical tokens (cached vs recomputed; bigmodel vs
    transformers on the copied weights); a tiny run keeps the script working."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers", reason="pip install 'bigmodel[hf]'")
    bench = Path(__file__).resolve().parent.parent / "bench" / "generate.py"
    done = subprocess.run([sys.executable, str(bench), "--reps", "1", "--new-tokens", "12", "--train-steps", "2",
                           "--window", "6"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| bigmodel") or line.startswith("| trans")]
    assert len(rows) == 6 and all(float(row.split("|")[2].replace(",", "")) > 0 for row in rows)
