import os
import pickle
import zipfile

import pytest
import torch

from bigmodel_cli.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from bigmodel_cli.errors import UserError


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_round_trip_and_no_leftovers(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 7}, path)
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "bigmodel-checkpoint/1", "payload": RunsCode(marker)}, path)
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_corrupt_or_truncated(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut short
        save_checkpoint({"model": {"w": torch.randn(1000)}}, path)
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_not_a_bigmodel_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(UserError, match="not a bigmodel checkpoint"):
        load_checkpoint(path)


def test_resolve_run_dir_prefers_best(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint({}, tmp_path / "checkpoints" / "last.pt")
    assert resolve_checkpoint(str(tmp_path)).name == "last.pt"
    save_checkpoint({}, tmp_path / "checkpoints" / "best.pt")
    assert resolve_checkpoint(str(tmp_path)).name == "best.pt"
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(str(empty))
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope.pt"))


def test_resolve_finds_sharded_folders(tmp_path):
    shards = tmp_path / "checkpoints" / "best.dcp"
    shards.mkdir(parents=True)
    save_checkpoint({"step": 3}, shards / "meta.pt")
    assert resolve_checkpoint(str(tmp_path)) == shards
    assert resolve_checkpoint(str(shards)) == shards
    state = load_checkpoint(shards)
    assert state["step"] == 3 and state["sharded_dir"] == str(shards)
