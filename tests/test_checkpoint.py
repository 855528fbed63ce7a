import os

import pytest
import torch

from bigmodel_cli.engine.checkpoint import CheckpointRecord, load_checkpoint, save_checkpoint
from bigmodel_cli.engine.find_checkpoint import best_in, find_checkpoint
from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.errors import UserError

pytestmark = pytest.mark.unit


def record(**fields):
    """What a `bigmodel train` checkpoint holds besides its weights (load_checkpoint checks it)."""
    return {"step": 0, "epoch": 0.0, "config": {"model": {}, "data": {}, "trainer": {}}, "choices": {},
            "data": {}, "spec": {"task": "classification", "input_kind": "vector", "input_shape": [4],
                                 "num_outputs": 2, "vocab_size": None, "block_size": None},
            "best": {}, "scheduler": {}, "scaler": {}, "rng": [], "world_size": 1, "data_position": {},
            "model": {}, "optimizer": {}, **fields}


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_round_trip_and_no_leftovers(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(record(model={"w": torch.ones(3)}, step=7), path)
    state = load_checkpoint(path)
    assert state.step == 7 and torch.equal(state.model["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_spec_without_the_optional_sizes_loads(tmp_path):
    spec = {"task": "classification", "input_kind": "vector", "input_shape": [4], "num_outputs": 2}
    save_checkpoint(record(spec=spec), tmp_path / "old.pt")  # vocab_size and block_size absent
    loaded = load_checkpoint(tmp_path / "old.pt").spec
    assert loaded.vocab_size is None and loaded.block_size is None and loaded.input_shape == (4,)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(record(step=1), path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match="could not write .*last.pt: disk full"):
        save_checkpoint(record(step=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1
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
        save_checkpoint(record(model={"w": torch.randn(1000)}), path)
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
    save_checkpoint(record(), tmp_path / "checkpoints" / "last.pt")
    assert find_checkpoint(tmp_path).path.name == "last.pt"
    save_checkpoint(record(), tmp_path / "checkpoints" / "best.pt")
    assert find_checkpoint(tmp_path).path.name == "best.pt"
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        find_checkpoint(empty)
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "nope.pt")


def test_resolve_finds_sharded_folders(tmp_path):
    shards = tmp_path / "checkpoints" / "best.dcp"
    shards.mkdir(parents=True)
    save_checkpoint(record(step=3), shards / "meta.pt")
    assert best_in(tmp_path, "ckpt") == shards
    state = load_checkpoint(shards, verify=False)  # (no DCP shards here: the record alone)
    assert state.step == 3 and state.is_sharded and state.sharded_dir == shards


def test_step_checkpoints_aliases_and_pruning_keep_the_best(tmp_path):
    from bigmodel_cli.engine.checkpoint_manager import CheckpointManager

    manager = CheckpointManager(tmp_path, sharded=False, keep_last=2)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, best in ((10, False), (20, True), (30, False), (40, False)):
        typed = {**record(step=step), "spec": DataSpec("classification", "vector", (4,), 2)}
        typed = CheckpointRecord(**{k: v for k, v in typed.items() if k not in ("model", "optimizer")})
        manager.save(step, typed, model, optimizer, is_best=best)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_00000020.pt", "step_00000030.pt",
                                                             "step_00000040.pt"]
    assert load_checkpoint(folder / "last.pt").step == 40
    assert load_checkpoint(folder / "best.pt").step == 20
    assert find_checkpoint(tmp_path).path.name == "best.pt"
    # A hidden temporary left by a killed write is removed by the next run's manager.
    (folder / ".step_00000050.pt.abc.tmp").write_bytes(b"torn")
    CheckpointManager(tmp_path, sharded=False)
    assert not list(folder.glob(".*.tmp"))


def test_stop_signals_are_recorded_for_the_loop():
    import signal

    from bigmodel_cli.engine.stopping import CHECKPOINT, NOTHING, STOP, StopSignals

    signals = StopSignals()
    with signals.installed():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.take() == CHECKPOINT and signals.take() == NOTHING  # consumed
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # at once again: the same request
        assert signals.take() == STOP == signals.take() and signals.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_config_changes_on_resume():
    from bigmodel_cli.engine.resume import config_changes

    saved = {"model": {"width": 8}, "optim": {"_target_": "A", "lr": 0.1}, "trainer": {"max_steps": 5}}
    assert config_changes(saved, {**saved, "trainer": {"max_steps": 9}}) == ["trainer.max_steps: 5 -> 9"]
    with pytest.raises(UserError, match="optim._target_"):
        config_changes(saved, {**saved, "optim": {"_target_": "B", "lr": 0.1}})


def test_truncate_metrics_keeps_what_the_resumed_run_does_not_redo(tmp_path):
    from bigmodel_cli.telemetry.sinks import truncate_jsonl as truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2, "val/loss": 1}\n{"step": 3, "loss": 1}\n'
                    '{"step": 2, "test/loss": 1}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2}\n{"step": 2, "val/loss": 1}\n'
