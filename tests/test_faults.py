"""Damaged checkpoints, a full or read-only disk, a stop during set-up, and values at the
edge of their type (issue 11, sections 4-6). Each ends with one line, a non-zero exit and
no traceback; nothing already written is lost or changed; and resume=auto skips each kind
of damaged checkpoint, continuing from the newest good one bit for bit."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel_cli.commands.train import train
from bigmodel_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from bigmodel_cli.errors import UserError
from conftest import compose_config, outcome_lines
from crafting import as_sharded
from test_resume import clean_env, start_cli, step_losses, summary

# Its module-scoped trained runs are made once: every test of the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("faults")


# Checkpoints at steps 4, 8 and 12; the only monitored validation is at step 12, so the
# best checkpoint is the last (a resumed run re-validates it); dropout on, so the RNG
# streams must continue exactly.
ARGS = ("model.hidden_sizes=[32]", "model.dropout=0.2", "trainer.max_steps=12", "trainer.val_every=100",
        "trainer.checkpoint_every=4", "trainer.keep_last=10", "trainer.log_every=1", "trainer.progress=plain")
NEWEST = "step_00000012"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(compose_config(*ARGS), run)
    return run


def copy_of(reference: Path, where: Path, sharded: bool) -> Path:
    """The reference run dir; `sharded`: with its step checkpoints as DCP folders."""
    run = shutil.copytree(reference, where, symlinks=True)
    if sharded:
        folder = run / "checkpoints"
        for step in (4, 8, 12):
            pt = folder / f"step_{step:08d}.pt"
            as_sharded(pt, folder / f"step_{step:08d}.dcp")
            pt.unlink()
        for link in ("last.pt", "best.pt"):
            (folder / link).unlink()
    return run


# ---------------------------------------------------------------- kinds of damage


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    """64 bytes in the middle inverted: what a bad disk or a bit-rotting copy does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def without(key: str):
    def drop(path: Path) -> None:
        record = path / "meta.pt" if path.is_dir() else path
        state = torch.load(record, weights_only=True)
        del state[key]
        state.pop("format")
        save_checkpoint(state, record)
    return drop


def shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


DAMAGE = {
    "pt-truncated": (False, truncate),
    "pt-flipped-bytes": (False, flip_bytes),
    "pt-without-config": (False, without("config")),
    "pt-without-optimizer": (False, without("optimizer")),
    "dcp-truncated-shard": (True, lambda p: truncate(shard(p))),
    "dcp-missing-shard": (True, lambda p: shard(p).unlink()),
    "dcp-flipped-shard-bytes": (True, lambda p: flip_bytes(shard(p))),
    "dcp-truncated-index": (True, lambda p: truncate(p / ".metadata")),
    "dcp-missing-index": (True, lambda p: (p / ".metadata").unlink()),
    "dcp-without-config": (True, without("config")),
}


def fingerprint(path: Path) -> dict:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_resume_auto_skips_it(run_cli, reference, tmp_path, kind, caplog):
    sharded, damage = DAMAGE[kind]
    run = copy_of(reference, tmp_path / "run", sharded)
    newest = run / "checkpoints" / (NEWEST + (".dcp" if sharded else ".pt"))
    damage(newest)
    before = fingerprint(newest)

    evaluated = run_cli("eval", f"ckpt={newest}")
    assert evaluated.returncode == 2, evaluated.output
    lines = [line for line in evaluated.stderr.splitlines() if line.strip()]  # eval logs nothing else
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in evaluated.output, lines
    assert any(word in lines[0] for word in ("damaged", "corrupt", "missing")), lines[0]
    assert fingerprint(newest) == before  # eval changes nothing

    out = train(compose_config(*ARGS), run)  # trainer.resume=auto
    assert out["resumed_from"].endswith("step_00000008" + (".dcp" if sharded else ".pt"))
    assert f"skipping damaged checkpoint {newest.name}" in caplog.text
    # Set aside, not deleted; the run goes on from step 8 exactly as the reference did.
    assert fingerprint(newest.with_name(f".{newest.name}.damaged")) == {
        k.replace(newest.name, f".{newest.name}.damaged"): v for k, v in before.items()}
    assert step_losses(run) == step_losses(reference)
    assert summary(run)["test"] == summary(reference)["test"]


@pytest.mark.integration
def test_every_checkpoint_damaged_is_one_line(reference, tmp_path):
    run = copy_of(reference, tmp_path / "run", sharded=False)
    for path in (run / "checkpoints").glob("step_*.pt"):
        flip_bytes(path)
    with pytest.raises(UserError, match="every checkpoint in .* is damaged"):
        train(compose_config(*ARGS), run)


@pytest.mark.unit
def test_the_integrity_check_costs_one_read(reference, tmp_path):
    """What it costs: a CRC-32 over each byte (bench/checkpoint_integrity.py times it on a
    gpt2-sized checkpoint); here only that verify=False skips it and both agree."""
    path = reference / "checkpoints" / f"{NEWEST}.pt"
    checked, unchecked = load_checkpoint(path), load_checkpoint(path, verify=False)
    assert all(torch.equal(checked.model[k], unchecked.model[k]) for k in checked.model)


# ---------------------------------------------------------------- the disk


def mount_tmpfs(point: Path, size: str) -> None:
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs root and mount to make a small or read-only disk ({done.stderr.strip()[:80]})")


@pytest.fixture
def small_disk(tmp_path):
    point = tmp_path / "disk"
    mount_tmpfs(point, "6m")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.integration
def test_a_full_disk_is_one_line_naming_the_free_space_and_the_last_checkpoint(run_cli, small_disk):
    # ~1 MB per checkpoint (weights and Adam state): the sixth or so does not fit.
    result = run_cli("train", "model.hidden_sizes=[256,256]", "trainer.max_steps=200", "trainer.checkpoint_every=5",
                     "trainer.keep_last=100", "logger=[jsonl]", "trainer.progress=plain",
                     f"hydra.run.dir={small_disk / 'run'}")
    assert result.returncode == 2, result.output
    lines = outcome_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "No space left on device" in lines[0] and "MiB free on that file system" in lines[0]
    assert "the last good checkpoint is" in lines[0]
    kept = sorted((small_disk / "run" / "checkpoints").glob("step_*.pt"))
    assert kept and all(load_checkpoint(path).step > 0 for path in kept)  # intact, every one
    assert str(kept[-1]) in lines[0]


@pytest.fixture
def read_only_disk(tmp_path):
    point = tmp_path / "disk"
    mount_tmpfs(point, "64m")

    def freeze() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)

    yield point, freeze
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.e2e
def test_a_read_only_run_dir_is_one_line_new_or_resumed(run_cli, read_only_disk):
    point, freeze = read_only_disk
    args = ("trainer.max_steps=10", "trainer.checkpoint_every=5", "trainer.progress=plain")
    started = start_cli(point, *args, "trainer.max_steps=100000", "hydra.run.dir=run", env=clean_env())
    deadline = time.monotonic() + 120
    while not list((point / "run" / "checkpoints").glob("step_*.pt")):
        assert time.monotonic() < deadline and started.poll() is None, "no checkpoint written"
        time.sleep(0.1)
    started.kill()
    started.communicate()
    before = fingerprint(point / "run")
    freeze()
    for run_dir in ("new", "run"):  # a new run, and the resume of the killed one
        result = run_cli("train", *args, f"hydra.run.dir={point / run_dir}")
        assert result.returncode == 2, result.output
        lines = outcome_lines(result.stderr)
        assert len(lines) == 1 and "Read-only file system" in lines[0], result.stderr
        assert "Traceback" not in result.output
    assert fingerprint(point / "run") == before


# ---------------------------------------------------------------- stops and values


@pytest.mark.e2e
def test_sigterm_during_set_up_is_one_line(tmp_path):
    proc = start_cli(tmp_path, "trainer.max_steps=100000", "trainer.progress=plain", "hydra.run.dir=run")
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / ".hydra").exists():  # the run dir exists; training has not begun
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    lines = outcome_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("stopped: SIGTERM") and "Traceback" not in stderr, stderr


@pytest.mark.integration
def test_generate_refuses_a_temperature_that_is_not_a_number(run_cli):
    result = run_cli("generate", "ckpt=whatever", "temperature=nan")
    assert result.returncode == 2 and "temperature must be a number >= 0" in result.stderr, result.output


def token_dir(folder: Path, largest: int, vocab_size=None, tokenizer=None) -> Path:
    folder.mkdir()
    (np.arange(20_000) % (largest + 1)).astype(np.uint16).tofile(folder / "train.bin")
    (np.arange(2_000) % 50).astype(np.uint16).tofile(folder / "val.bin")
    if vocab_size is not None:
        meta = {"dtype": "uint16", "vocab_size": vocab_size, **({"tokenizer": tokenizer} if tokenizer else {})}
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.integration
def test_token_ids_beyond_the_vocabulary_are_refused_at_start(run_cli, tmp_path):
    token_dir(tmp_path / "tok", largest=100)  # a nanoGPT-style folder: no meta.json
    result = run_cli("train", "model=gpt", "data=tokens", "data.dir=tok", "data.vocab_size=65",
                     "trainer.max_steps=5")
    assert result.returncode == 2, result.output
    assert "holds token id 100, but the vocabulary has 65 ids; set data.vocab_size to at least 101" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_token_ids_beyond_the_vocabulary_are_caught_in_any_batch(tmp_path):
    from bigmodel_cli.data.tokens import TokenFiles

    token_dir(tmp_path / "tok", largest=100)
    data = TokenFiles(dir=str(tmp_path / "tok"), vocab_size=101, block_size=16, batch_size=4)
    data.setup()
    data._spec = data._spec.__class__(**{**data._spec.__dict__, "vocab_size": 60})  # as if past the checked head
    with pytest.raises(UserError, match="holds token id"):
        for _ in data.train_batches(seed=0):
            pass


# A padding of 10^12 would make the tokenizers library abort the process on first use.
HOSTILE_BPE = json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel"},
                          "decoder": {"type": "ByteLevel"}, "padding": {"strategy": {"Fixed": 10**12}}})


@pytest.mark.parametrize("tokenizer", [{"kind": "char", "vocab": 5}, {"kind": "bpe", "json": "{not json"},
                                       {"kind": "bpe", "json": HOSTILE_BPE}, {"kind": "wordpiece"}, "char"])
@pytest.mark.integration
def test_a_broken_tokenizer_in_meta_json_is_refused_when_the_data_opens(run_cli, tmp_path, tokenizer):
    token_dir(tmp_path / "tok", largest=40, vocab_size=50, tokenizer=tokenizer)
    result = run_cli("train", "model=gpt", "data=tokens", "data.dir=tok", "trainer.max_steps=5")
    assert result.returncode == 2 and "broken tokenizer" in result.stderr, result.output


@pytest.mark.e2e
def test_an_unexpected_error_is_one_line_with_the_traceback_in_the_log(run_cli, tmp_path):
    helpers = str(Path(__file__).parent / "helpers")
    result = run_cli("train", "model=custom", "model._target_=flaky_model.NonFiniteAt", "+model.at=-1",
                     "+model.raise_at=3", "trainer.max_steps=10", "hydra.run.dir=run",
                     env={"PYTHONPATH": helpers + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unexpected ZeroDivisionError: raised on purpose" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" in (tmp_path / "run" / "train.log").read_text()


# ---------------------------------------------------------------- odd files in a sharded folder


@pytest.mark.integration
def test_a_link_or_pipe_in_a_sharded_folder_is_refused_without_hanging(run_cli, reference, tmp_path):
    folder = as_sharded(reference / "checkpoints" / f"{NEWEST}.pt", tmp_path / "linked.dcp")
    outside = tmp_path / "outside.distcp"
    shutil.move(str(shard(folder)), outside)
    (folder / outside.name.replace("outside", "__0_0")).symlink_to(outside)  # the shard, but elsewhere
    result = run_cli("eval", f"ckpt={folder}")
    assert result.returncode == 2 and "is a link or a special file" in result.stderr, result.output
    piped = as_sharded(reference / "checkpoints" / f"{NEWEST}.pt", tmp_path / "piped.dcp")
    (piped / ".metadata").unlink()
    os.mkfifo(piped / ".metadata")  # a read of it would wait forever
    result = run_cli("eval", f"ckpt={piped}", timeout=120)
    assert result.returncode == 2 and "is a link or a special file" in result.stderr, result.output


@pytest.mark.integration
def test_a_compressed_archive_is_refused(run_cli, reference, tmp_path):
    import zipfile

    source = reference / "checkpoints" / f"{NEWEST}.pt"
    packed = tmp_path / "deflated.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    result = run_cli("eval", f"ckpt={packed}")
    assert result.returncode == 2 and "compressed members, which torch.save never writes" in result.stderr


@pytest.mark.integration
def test_a_second_damaged_copy_is_set_aside_too(reference, tmp_path):
    run = copy_of(reference, tmp_path / "run", sharded=False)
    newest = run / "checkpoints" / f"{NEWEST}.pt"
    (run / "checkpoints" / f".{NEWEST}.pt.damaged").write_bytes(b"set aside by an earlier run")
    truncate(newest)
    out = train(compose_config(*ARGS), run)
    assert out["resumed_from"].endswith("step_00000008.pt")
    assert (run / "checkpoints" / f".{NEWEST}.pt.damaged.1").is_file()


@pytest.mark.unit
def test_a_failed_sharded_write_names_the_disk(tmp_path, monkeypatch):
    """DCP reports a failed write as a CheckpointException, a BaseException that would get
    past every handler of ordinary errors."""
    import errno

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from bigmodel_cli.engine.files import WriteFailed
    from bigmodel_cli.engine.sharded import save_sharded

    def full_disk(*args, **kwargs):
        raise CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(WriteFailed, match="could not write .*step.dcp: No space left on device"):
        save_sharded({}, model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "step.dcp")


@pytest.mark.parametrize("args,message", [
    (["+data.batch_size=0"], "data.batch_size must be > 0"),
    (["batch_size=-4"], "batch_size must be > 0"),
    (["eval_batches=0"], "eval_batches must be > 0"),
])
@pytest.mark.integration
def test_eval_values_at_the_edge(run_cli, reference, args, message):
    result = run_cli("eval", f"ckpt={reference}", *args)
    assert result.returncode == 2 and message in result.stderr, result.output


@pytest.mark.unit
def test_a_vanishing_temperature_samples_greedily():
    from bigmodel_cli.engine.sampling import sample_tokens

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 3.0, 1.0]).expand(x.shape[0], x.shape[1], 3)

    for temperature in (0.0, 1e-320, 1e-9):
        tokens = [int(t) for t in sample_tokens(Fixed(), torch.zeros(1, 1, dtype=torch.long), 4, 8, temperature)]
        assert tokens == [1, 1, 1, 1]
