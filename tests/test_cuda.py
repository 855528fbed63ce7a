"""The CUDA paths: bf16 and fp16 (loss scaling), TF32, compile, NCCL under torchrun (DDP
and FSDP), pinned and prefetched token batches, MFU, exact resume and generation on a GPU.

CI has no GPU, so these skip there; on a GPU machine: `pytest tests/test_cuda.py`.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigmodel_cli.commands.train import train
from bigmodel_cli.engine.checkpoint import load_checkpoint
from bigmodel_cli.telemetry.efficiency import peak_flops
from test_resume import records, summary

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on a GPU machine: pytest tests/test_cuda.py)")]

GPT = ("model=gpt", "data=text", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "data.block_size=64",
       "trainer.device=cuda", "trainer.log_every=5", "trainer.val_every=20", "trainer.eval_batches=4",
       "trainer.progress=plain", "logger=[jsonl]")


def train_records(run_dir):
    return [r for r in records(run_dir) if "loss" in r]


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_gpt_trains_in_each_precision_and_logs_gpu_figures(compose, tmp_path, precision):
    train(compose(*GPT, f"trainer.precision={precision}", "trainer.max_steps=60"), tmp_path)
    logged = train_records(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5, logged
    assert all(r["peak_mem_mb"] > 0 for r in logged)  # torch.cuda.max_memory_allocated
    assert all(r["data_wait"] < 0.5 for r in logged[1:])
    if peak_flops(torch.device("cuda"), precision):  # a GPU of the peak table
        assert all(0 < r["mfu"] < 1 for r in logged), logged
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(t.device.type == "cpu" for t in state.model.values())  # loads anywhere
    if precision == "fp16":
        assert state.scaler["scale"] > 0  # the loss scale continues on resume
    if precision == "fp32":
        assert torch.get_float32_matmul_precision() == "high"  # trainer.tf32=true (default)


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.integration
def test_tf32_off_means_full_fp32(compose, tmp_path, restore_matmul_precision):
    train(compose(*GPT, "trainer.tf32=false", "trainer.max_steps=5"), tmp_path)
    assert torch.get_float32_matmul_precision() == "highest"


def token_dir(folder, vocab=97):
    folder.mkdir()
    for split in ("train", "val"):
        (np.arange(20_000) % vocab).astype(np.uint16).tofile(folder / f"{split}.bin")
    return folder


@pytest.mark.integration
@pytest.mark.parametrize("data", ["text", "tokens"])
def test_exact_resume_on_the_gpu(compose, tmp_path, data):
    """Deterministic kernels, dropout on, bf16: a resumed run repeats the reference bit for
    bit (data=tokens: with the prefetch thread, on by default on CUDA)."""
    source = (("data=text",) if data == "text" else
              ("data=tokens", f"data.dir={token_dir(tmp_path / 'tok')}", "data.vocab_size=97"))
    exact = (*(a for a in GPT if a != "data=text"), *source, "model.dropout=0.1", "trainer.precision=bf16", "trainer.deterministic=true",
             "trainer.log_every=1", "trainer.val_every=10", "trainer.max_steps=30")
    full = tmp_path / "full"
    train(compose(*exact, "trainer.checkpoint_every=1", "trainer.keep_last=100"), full)
    resumed = tmp_path / "resumed"
    train(compose(*exact, f"trainer.resume={full / 'checkpoints' / 'step_00000015.pt'}"), resumed)
    again = {r["step"]: r["loss"] for r in train_records(resumed)}
    reference = {r["step"]: r["loss"] for r in train_records(full) if r["step"] > 15}
    assert min(again) == 16 and again == reference
    assert summary(resumed)["test"] == summary(full)["test"]


@pytest.mark.integration
def test_compiled_bf16_training_saves_the_plain_model(compose, tmp_path):
    train(compose(*GPT, "trainer.precision=bf16", "trainer.compile=true", "trainer.max_steps=30"), tmp_path)
    logged = train_records(tmp_path)
    assert logged[-1]["loss"] < logged[0]["loss"]
    weights = load_checkpoint(tmp_path / "checkpoints" / "last.pt").model
    assert weights and not any(k.startswith("_orig_mod") for k in weights)


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_under_torchrun(tmp_path, strategy):
    """One GPU here: a world of one over NCCL still takes the whole process-group path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "bigmodel_cli", "train", *GPT, "trainer.precision=bf16", f"trainer.strategy={strategy}",
           "trainer.backend=nccl", "trainer.max_steps=20", "hydra.run.dir=run"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "rank 0 of 1 (torchrun), device cuda:0" in (tmp_path / "run" / "train_rank0.log").read_text()
    logged = train_records(tmp_path / "run")
    assert len(logged) == 4 and all(math.isfinite(r["loss"]) for r in logged)
    best = "best.dcp" if strategy == "fsdp" else "best.pt"
    assert (tmp_path / "run" / "checkpoints" / best).exists()


@pytest.mark.integration
def test_token_batches_are_prefetched_onto_the_gpu(tmp_path):
    from bigmodel_cli.data.prefetch import Prefetched
    from bigmodel_cli.data.tokens import TokenFiles

    data = TokenFiles(dir=str(token_dir(tmp_path / "tok")), batch_size=4, block_size=32, vocab_size=97)
    data.setup()
    data.to(torch.device("cuda"))
    loader = data.train_batches(seed=0)
    assert isinstance(loader, Prefetched)  # on by default on CUDA
    x, y = next(iter(loader))
    assert x.device.type == "cuda" and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.integration
def test_prepare_train_on_tokens_and_generate_on_the_gpu(run_cli, tmp_path):
    corpus = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 400
    (tmp_path / "corpus.txt").write_text(corpus, encoding="utf-8")
    assert run_cli("prepare", "data.path=corpus.txt", "out=tok").returncode == 0
    trained = run_cli("train", "data=tokens", "data.dir=tok", *GPT[2:], "model=gpt", "trainer.precision=bf16",
                      "trainer.max_steps=100", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    assert "device cuda" in trained.output
    assert summary(tmp_path / "run")["test"]["loss"] < 1.5  # from ln(vocab 30) = 3.4 before training
    sampled = run_cli("generate", "ckpt=run", "prompt=To be", "max_new_tokens=60", "device=cuda")
    assert sampled.returncode == 0, sampled.output
    assert sampled.stdout.startswith("To be") and len(sampled.stdout) > 50


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs a machine with exactly one GPU")
def test_two_ranks_on_one_gpu_fail_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bigmodel_cli", "train", *GPT, "trainer.max_steps=5", "hydra.run.dir=run"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert "would share one GPU" in done.stderr and "NCCL needs a GPU per rank" in done.stderr, done.stderr[-3000:]
