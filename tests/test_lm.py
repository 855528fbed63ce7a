"""The language-model path: prepare -> data=tokens -> train -> generate."""

import json
import resource
import threading

import numpy as np
import pytest
import torch

from bigmodel_cli.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_state
from bigmodel_cli.data.tokens import TokenFiles
from bigmodel_cli.data.windows import RandomWindows
from bigmodel_cli.errors import UserError


CORPUS = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! é\n" * 300
TINY_GPT = ("model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.block_size=32",
            "trainer.val_every=50", "trainer.log_every=25", "trainer.progress=plain")


@pytest.mark.integration
def test_prepare_train_generate(run_cli, tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    prepared = run_cli("prepare", "data.path=corpus.txt", "out=tok")
    assert prepared.returncode == 0, prepared.output
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "char"
    train_ids = np.fromfile(tmp_path / "tok" / "train.bin", dtype=np.uint16)
    assert len(train_ids) == meta["tokens"]["train"] and train_ids.max() < meta["vocab_size"]
    trained = run_cli("train", "data=tokens", "data.dir=tok", "trainer.max_steps=100", *TINY_GPT,
                      "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["loss"] < np.log(meta["vocab_size"])  # it learned something
    sampled = run_cli("generate", "ckpt=run", "prompt=The quick", "max_new_tokens=40", "num_samples=2")
    assert sampled.returncode == 0, sampled.output
    assert sampled.stdout.count("The quick") == 2 and len(sampled.stdout) > 2 * 50


@pytest.mark.integration
def test_generate_refuses_a_classifier(run_cli, tmp_path):
    trained = run_cli("train", "trainer.max_steps=2", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.output
    result = run_cli("generate", "ckpt=run")
    assert result.returncode == 2 and "is not a language model" in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizers_round_trip_through_their_saved_state(kind):
    if kind == "bpe":
        pytest.importorskip("tokenizers")
    cls = {"char": CharTokenizer, "byte": ByteTokenizer, "bpe": BPETokenizer}[kind]
    tokenizer = cls.fit(CORPUS, 300)
    again = tokenizer_from_state(json.loads(json.dumps(tokenizer.state_dict())))
    ids = again.encode(CORPUS[:500])
    assert again.decode([int(i) for i in ids]) == CORPUS[:500]
    if kind == "bpe":
        assert len(ids) < len(CORPUS[:500].encode()) / 2  # merges make it shorter than bytes


def make_token_dir(folder, train_tokens: int, sparse: bool = False, meta: bool = True, vocab: int = 50257):
    """Token files of ids below `vocab` (GPT-2's by default; meta.json pads it to a multiple of 64)."""
    folder.mkdir()
    if sparse:  # a file larger than 4 GiB that takes no disk space and is never read whole
        with open(folder / "train.bin", "wb") as f:
            f.truncate(train_tokens * 2)
    else:
        (np.arange(train_tokens) % vocab).astype(np.uint16).tofile(folder / "train.bin")
    (np.arange(1000) % 50).astype(np.uint16).tofile(folder / "val.bin")
    if meta:
        (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": -(-vocab // 64) * 64}))


@pytest.mark.unit
def test_a_token_file_over_4_gib_opens_without_being_read(tmp_path):
    tokens = 2_300_000_000  # 4.6 GB of uint16
    make_token_dir(tmp_path / "big", tokens, sparse=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = TokenFiles(dir=str(tmp_path / "big"), batch_size=8, block_size=128)
    data.setup()
    assert len(data.tokens["train"]) == tokens
    loader = data.train_batches(seed=0)
    x, y = next(iter(loader))
    assert x.shape == (8, 128) and x.dtype == torch.int64
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"resident memory grew by {grown_mib:.0f} MiB"


@pytest.mark.unit
def test_window_sampler_is_deterministic_and_resumable(tmp_path):
    make_token_dir(tmp_path / "d", 100_000)
    data = TokenFiles(dir=str(tmp_path / "d"), batch_size=4, block_size=16)
    data.setup()
    first = list(data.train_batches(seed=3))
    again = list(data.train_batches(seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    resumed = data.train_batches(seed=3)
    resumed.set_epoch(0, start=5)
    assert torch.equal(next(iter(resumed))[0], first[5][0])
    x, y = first[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    other_rank = RandomWindows(data.tokens["train"], 16, 4, seed=3, rank=1, world_size=2)
    assert not torch.equal(next(iter(other_rank))[0], first[0][0])


@pytest.mark.unit
def test_nanogpt_style_dirs_without_meta(tmp_path):
    make_token_dir(tmp_path / "d", 10_000, meta=False)
    with pytest.raises(UserError, match="set data.vocab_size"):
        TokenFiles(dir=str(tmp_path / "d")).setup()
    data = TokenFiles(dir=str(tmp_path / "d"), vocab_size=50304)
    data.setup()
    assert data.spec.vocab_size == 50304 and "test" in data.tokens  # val stands in for test


@pytest.mark.unit
def test_activation_checkpointing_gives_the_same_gradients():
    from bigmodel_cli.engine.parallelize import checkpoint_activations
    from bigmodel_cli.models.gpt import GPT

    torch.manual_seed(0)
    plain = GPT(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16)
    recomputed = GPT(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16)
    checkpoint_activations(recomputed)
    recomputed.load_state_dict(plain.state_dict())  # the same keys: blocks are not wrapped
    x = torch.randint(0, 20, (3, 8))
    for model in (plain, recomputed):
        model(x).sum().backward()
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.compile
def test_compiled_training_saves_the_plain_model(compose, tmp_path):
    from bigmodel_cli.commands.train import train
    from bigmodel_cli.engine.checkpoint import load_checkpoint

    train(compose("model=gpt", "data=text", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                  "data.block_size=16", "trainer.max_steps=6", "trainer.val_every=3", "trainer.eval_batches=2",
                  "trainer.compile=true", "trainer.progress=plain"), tmp_path)
    weights = load_checkpoint(tmp_path / "checkpoints" / "last.pt").model
    assert weights and not any(k.startswith("_orig_mod") for k in weights)


@pytest.mark.unit
def test_prefetched_batches_are_the_loaders_own(tmp_path):
    from bigmodel_cli.data.prefetch import Prefetched

    make_token_dir(tmp_path / "d", 50_000)
    data = TokenFiles(dir=str(tmp_path / "d"), batch_size=4, block_size=16, prefetch=2)
    data.setup()
    loader = data.train_batches(seed=1)
    assert isinstance(loader, Prefetched)
    readers = set()
    host_window = loader.loader.host_window

    def recorded(i):  # which thread reads the windows
        readers.add(threading.current_thread().name)
        return host_window(i)

    loader.loader.host_window = recorded
    plain = RandomWindows(data.tokens["train"], 16, 4, seed=1)
    loader.set_epoch(2, start=3)
    plain.set_epoch(2, start=3)
    got, want = list(loader), list(plain)
    assert readers == {"bigmodel-prefetch"}
    assert len(got) == len(want) == len(loader) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    stream = iter(loader)  # a consumer that stops early ends the thread
    next(stream)
    stream.close()
    assert not any(t.name == "bigmodel-prefetch" for t in threading.enumerate())


@pytest.mark.unit
def test_a_failing_loader_raises_through_the_prefetch_thread():
    from bigmodel_cli.data.prefetch import Prefetched

    class Broken:
        def host_windows(self):
            yield 1
            raise OSError("disk gone")

        def finish(self, item):
            return item * 10

    stream = iter(Prefetched(Broken(), depth=2))
    assert next(stream) == 10
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


@pytest.mark.integration
def test_prefetch_leaves_the_run_unchanged(compose, tmp_path):
    """Across epoch boundaries (7 batches per epoch here), where the thread restarts."""
    from bigmodel_cli.commands.train import train

    make_token_dir(tmp_path / "d", 3_000, vocab=256)  # a small vocabulary: the head's softmax is most of a step
    losses = {}
    for depth in (0, 3):
        run = tmp_path / f"prefetch{depth}"
        train(compose("data=tokens", f"data.dir={tmp_path / 'd'}", f"data.prefetch={depth}", *TINY_GPT[:-3],
                      "model.dropout=0.1", "trainer.max_steps=20", "trainer.log_every=1", "trainer.val_every=10",
                      "trainer.device=cpu", "trainer.progress=plain"), run)
        losses[depth] = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert not any(t.name == "bigmodel-prefetch" for t in threading.enumerate())  # fit ended it
    assert losses[0] == losses[3] and len([x for x in losses[0] if x is not None]) == 20


@pytest.mark.unit
def test_changing_prefetch_on_resume_is_allowed():
    from bigmodel_cli.engine.resume import config_changes

    saved = {"data": {"dir": "d", "prefetch": None}, "model": {"n_layer": 2}}
    assert config_changes(saved, {"data": {"dir": "d", "prefetch": 0}, "model": {"n_layer": 2}}) == [
        "data.prefetch: None -> 0"]
    with pytest.raises(UserError, match="data.dir"):
        config_changes(saved, {"data": {"dir": "other", "prefetch": None}, "model": {"n_layer": 2}})


@pytest.mark.unit
def test_bad_token_folders_fail_with_one_line(tmp_path):
    make_token_dir(tmp_path / "d", 1_000)
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50304,
                                                          "tokens": {"train": 999}}))
    with pytest.raises(UserError, match="meta.json says 999"):  # incomplete or from another prepare
        TokenFiles(dir=str(tmp_path / "d")).setup()
    with pytest.raises(UserError, match="smaller than the 50304 token ids"):
        TokenFiles(dir=str(tmp_path / "d"), vocab_size=100).setup()
    (tmp_path / "d" / "meta.json").write_text("[]")
    with pytest.raises(UserError, match="not a bigmodel prepare meta file"):
        TokenFiles(dir=str(tmp_path / "d")).setup()
    (tmp_path / "d" / "meta.json").unlink()
    (tmp_path / "d" / "train.bin").write_bytes(b"\x00" * 1001)  # torn: not a whole number of uint16
    with pytest.raises(UserError, match="is not a uint16 token file"):
        TokenFiles(dir=str(tmp_path / "d"), vocab_size=50304).setup()
