"""Checkpoints made by hand, as an attacker or a failing disk would make them."""

import pickle
import warnings
from pathlib import Path


from bigmodel_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from bigmodel_cli.engine.files import digests_of


class RunsCode:
    """Unpickling it runs `code` (which creates the marker), then yields `result`."""

    def __init__(self, code: str, result=None):
        self.code, self.result = code, result

    def __reduce__(self):
        return (eval, (f"(exec({self.code!r}), __import__('pickle').loads({pickle.dumps(self.result)!r}))[1]",))


def touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def as_sharded(checkpoint: Path, folder: Path, item_payload=None) -> Path:
    """A sharded (DCP) copy of a single-process checkpoint, as an FSDP run writes one;
    `item_payload` replaces the model's first weight (stored by DCP as a pickled item)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from omegaconf import OmegaConf

    from bigmodel_cli.build.parts import build_model, build_optimizer
    from bigmodel_cli.engine.sharded import save_sharded

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: as meant
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    state = load_checkpoint(checkpoint)
    config = OmegaConf.create(state.config)
    model = build_model(config.model, state.spec)
    model.load_state_dict(state.model)
    optimizer = build_optimizer(config.optim, model)
    optimizer.load_state_dict(state.optimizer)
    meta = {k: v for k, v in state.to_state().items() if k not in ("model", "optimizer")}
    save_sharded(meta, model, optimizer, folder)
    if item_payload is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        model_state[next(iter(model_state))] = item_payload
        for old in folder.glob("*.distcp"):
            old.unlink()
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder), no_dist=True)
        resign(folder)
    return folder


def resign(folder: Path) -> None:
    """Rewrite meta.pt's digests to match the (tampered) files, as an attacker would."""
    meta = load_checkpoint(folder, verify=False).to_state()
    meta["digests"] = digests_of(folder, sorted(p.name for p in folder.iterdir() if p.name != "meta.pt"))
    save_checkpoint(meta, folder / "meta.pt")


def evil_index(folder: Path, marker: Path) -> Path:
    """Its .metadata runs code, then returns the genuine index."""
    index = folder / ".metadata"
    genuine = pickle.loads(index.read_bytes())
    index.write_bytes(pickle.dumps(RunsCode(touch(marker), genuine)))
    resign(folder)
    return folder
