"""Sharded (FSDP) checkpoints: folders written with torch.distributed.checkpoint (DCP).

A folder NAME.dcp/ holds DCP's shards (`__<rank>_<n>.distcp`, one set per rank), DCP's
index of them (`.metadata`), and `meta.pt`: bigmodel's record (step, config, ...) with the
size and CRC-32 of every other file in the folder, so damage is found before loading.

Reading one never runs code from it. DCP itself unpickles `.metadata` with plain
`pickle.load`, and non-tensor items (optimizer hyperparameters) with
`torch.load(weights_only=False)`. Here the index goes through a restricted unpickler that
admits only the classes DCP's index is made of, items through `weights_only=True`, and the
index may only name files inside its own folder.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from bigmodel_cli.engine.checkpoint_file import save_checkpoint
from bigmodel_cli.engine.files import (WriteFailed, check_digests, digests_of, fsync_dir, os_error_behind,
                                      refusal_reason, replace_dir)
from bigmodel_cli.errors import UserError, first_line
from bigmodel_cli.engine import distributed

log = logging.getLogger("bigmodel")

META = "meta.pt"
INDEX = ".metadata"  # DCP's own name for its index

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# What DCP's index is made of (torch 2.4 to 2.13): its dataclasses, torch sizes, dtypes and
# layouts, and the path it was saved under. Nothing here can run code when called.
_ALLOWED = {(_DCP_METADATA, name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


@functools.lru_cache(maxsize=None)
def _buildable() -> frozenset:
    """The index's record types: what it may set attributes on."""
    import torch.distributed.checkpoint.filesystem as filesystem
    import torch.distributed.checkpoint.metadata as metadata

    names = [name for module, name in _ALLOWED if module == _DCP_METADATA and name != "_MEM_FORMAT_ENCODING"]
    return frozenset([getattr(metadata, name) for name in names if hasattr(metadata, name)]
                     + [filesystem._StorageInfo])


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _IndexUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be vetted
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP's index")

    def _load_build(self) -> None:
        # BUILD sets attributes: only on the index's own records, never on a class or a
        # shared object (an enum member, a dtype) whose change would outlive this load.
        if type(self.stack[-2]) not in _buildable():
            raise pickle.UnpicklingError(f"BUILD on a {type(self.stack[-2]).__name__}")
        pickle._Unpickler.load_build(self)

    def _refuse_extension(self) -> None:
        # copyreg's extension codes could hand back an object cached by another unpickling.
        raise pickle.UnpicklingError("extension codes are not part of DCP's index")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build
    for _code in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_code[0]] = _refuse_extension
    del _code


def read_index(folder: Path):
    """DCP's index of a sharded checkpoint, unpickled without running code and checked to
    name only files inside `folder`. Refusals and damage are UserErrors."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / INDEX
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except RefusedGlobal as err:
        raise UserError(f"refused to load sharded checkpoint {folder}: its {INDEX} names {err.name}, which "
                        "DCP's index never holds and which could run code when unpickled; only load "
                        "checkpoints you trust") from None
    except FileNotFoundError:
        raise UserError(f"sharded checkpoint {folder} is damaged (its shard index {INDEX} is missing); "
                        "use another checkpoint") from None
    except Exception as err:  # a torn or garbled pickle fails in many ways; all mean damage
        raise UserError(f"sharded checkpoint {folder} is damaged (its {INDEX} does not load: "
                        f"{type(err).__name__}); use another checkpoint") from None
    problem = _index_problem(index, Metadata)
    if problem:
        raise UserError(f"sharded checkpoint {folder} is damaged or not a DCP checkpoint ({problem}); "
                        "use another checkpoint")
    return index


def _index_problem(index: Any, metadata_type: type) -> Optional[str]:
    if not isinstance(index, metadata_type):
        return f"{INDEX} holds a {type(index).__name__}, not DCP metadata"
    if not isinstance(index.state_dict_metadata, dict) or not isinstance(index.storage_data, dict):
        return f"{INDEX} is malformed"
    for info in index.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            return f"{INDEX} names a file outside its folder ({str(name)[:80]!r})"
    return None


def check_folder(folder: Path, meta: Dict[str, Any]) -> None:
    """Refuse a sharded checkpoint whose files are missing, torn, changed since they were
    written or not plain files in the folder (links, devices), or whose index or items
    could run code. Reads every shard once (CRC-32)."""
    _require_plain_file(folder, INDEX)
    index = read_index(folder)
    named = sorted({info.relative_path for info in index.storage_data.values()} | {INDEX})
    for name in named:
        _require_plain_file(folder, name)
    digests = meta.get("digests")
    if digests is None:  # written before digests were recorded: vetted, but not checked byte by byte
        log.debug("sharded checkpoint %s records no digests; its files are not checked", folder)
    elif not _is_digest_table(digests) or not set(named) <= set(digests):
        raise UserError(f"sharded checkpoint {folder} is damaged (the digests in its {META} do not cover its "
                        "files); use another checkpoint")
    else:
        problem = check_digests(folder, {name: (size, crc) for name, (size, crc) in digests.items()})
        if problem:
            raise UserError(f"sharded checkpoint {folder} is damaged ({problem}); use another checkpoint")
    vet_items(folder, index)


def _require_plain_file(folder: Path, name: str) -> None:
    """A file of the folder itself: not a link (to anywhere), a pipe that would hang a read,
    or a device."""
    try:
        mode = os.lstat(folder / name).st_mode
    except FileNotFoundError:
        raise UserError(f"sharded checkpoint {folder} is damaged ({name} is missing); use another checkpoint") \
            from None
    if not stat.S_ISREG(mode):
        raise UserError(f"refused to load sharded checkpoint {folder}: {name} is a link or a special file, not a "
                        "file of the checkpoint; only load checkpoints you trust")


def vet_items(folder: Path, index) -> None:
    """Unpickle every non-tensor item (small: optimizer hyperparameters) with weights_only,
    so that a crafted one is refused now, not midway through loading."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for key, info in index.storage_data.items():
        if info.transform_descriptors or not isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue  # tensors (loaded with weights_only by DCP itself); compressed items are vetted on load
        try:
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserError(f"refused to load sharded checkpoint {folder}: its item {key.fqn} could run code "
                            f"when unpickled ({refusal_reason(err)}); only load checkpoints you trust") from None
        except Exception as err:  # a torn item fails in many ways; all mean damage
            raise UserError(f"sharded checkpoint {folder} is damaged (item {key.fqn} does not load: "
                            f"{type(err).__name__}); use another checkpoint") from None


def _is_digest_table(digests: Any) -> bool:
    return isinstance(digests, dict) and all(
        isinstance(name, str) and Path(name).name == name and isinstance(pair, (list, tuple)) and len(pair) == 2
        and all(isinstance(v, int) for v in pair) for name, pair in digests.items())


# --------------------------------------------------------------------------- writing


def save_sharded(meta: Dict[str, Any], model, optimizer, path: Path) -> None:
    """Every rank writes its shards into a temporary folder that rank 0 then renames to
    `path` once all are done; a crash mid-write leaves no folder under that name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict


    main = distributed.is_main_process()
    tmp = path.with_name(f".{path.name}.tmp")
    if main and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=optimizer_layout(flat=True))
    _save(dcp, {"model": model_state, "optimizer": optim_state}, tmp, path)
    distributed.barrier()  # every shard is on disk (DCP fsyncs its files)
    # Each rank digests the shards it wrote; rank 0 the index and anything left over.
    rank = distributed.rank()
    own = digests_of(tmp, sorted(p.name for p in tmp.glob(f"__{rank}_*")))
    everyone = distributed.all_gather_objects(own)
    if main:
        digests = {name: pair for part in everyone for name, pair in part.items()}
        rest = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in digests)
        digests.update(digests_of(tmp, rest))
        save_checkpoint({**meta, "digests": digests}, tmp / META)
        replace_dir(tmp, path)
        fsync_dir(path.parent)
    distributed.barrier()


def _save(dcp, state: Dict[str, Any], tmp: Path, path: Path) -> None:
    """dcp.save, with a failed write (a full disk) as WriteFailed; its own exception type
    is a BaseException that would get past every handler of ordinary errors."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as err:
        cause = _root_cause(err)
        if os_error_behind(cause) is not None:
            raise WriteFailed(path, cause) from None
        if isinstance(err, CheckpointException):
            raise RuntimeError(f"writing sharded checkpoint {path} failed: {type(cause).__name__}: "
                               f"{first_line(cause)}") from cause
        raise


# --------------------------------------------------------------------------- reading


def optimizer_layout(flat: bool):
    """How optimizer state is keyed in a sharded checkpoint. Flat (written since pipeline
    parallelism): one entry per parameter name and setting ("state.<name>.exp_avg",
    "param_groups.<name>.lr"), so pipeline stages, each with its own parameters, write
    disjoint entries that any layout reads back. Nested: one "param_groups" list (older
    FSDP checkpoints)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


def flat_optimizer_state(entries) -> bool:
    # (DCP stores a nested group's parameter list as "optimizer.param_groups.<i>.params"; a flat
    # checkpoint has no such entry.)
    return "optimizer.param_groups.0.params" not in entries


def load_training_state(model, optimizer, path: Path, aliases: Optional[Dict[str, Tuple[str, ...]]] = None) -> None:
    """Fill model and optimizer from a sharded checkpoint (DCP reshards to this world size
    and to this run's pipeline stages). `aliases`: a parameter's other names, under which the
    checkpoint may hold its optimizer state (a tied weight that this rank knows by another name)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    entries = read_index(path).state_dict_metadata
    options = optimizer_layout(flat=flat_optimizer_state(entries))
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    stored = stored_names(optim_state, entries, aliases or {}) if options.flatten_optimizer_state_dict else {}
    state = {"model": model_state, "optimizer": {stored.get(k, k): v for k, v in optim_state.items()}}
    _load(state, path)
    optim_state = {k: state["optimizer"][stored.get(k, k)] for k in optim_state}
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state,
                   options=options)


def stored_names(optim_state: Dict[str, Any], entries, aliases: Dict[str, Tuple[str, ...]]) -> Dict[str, str]:
    """Flat optimizer keys the checkpoint lacks -> the key it holds them under, by a parameter
    alias ("state.lm_head.weight.exp_avg" -> "state.tok_emb.weight.exp_avg")."""
    stored = {}
    for key in optim_state:
        if f"optimizer.{key}" in entries:
            continue
        kind, _, rest = key.partition(".")
        for name, others in aliases.items():
            if rest.startswith(f"{name}."):
                found = [f"{kind}.{other}{rest[len(name):]}" for other in others
                         if f"optimizer.{kind}.{other}{rest[len(name):]}" in entries]
                if found:
                    stored[key] = found[0]
    return stored


def load_model(model, path: Path) -> None:
    """Fill `model` (sharded or not, any world size, or a single process) from a sharded checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    _load(state, path)
    try:
        set_model_state_dict(model, state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"sharded checkpoint {path} does not fit this model ({type(err).__name__}: "
                        f"{first_line(err)}); use the model settings it was trained with") from None


def _load(state: Dict[str, Any], path: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        reader, planner = _safe_dcp_classes()
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader(path), planner=planner(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        cause = _root_cause(err)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        if isinstance(cause, pickle.UnpicklingError):
            raise UserError(f"refused to load sharded checkpoint {path}: an item in it could run code when "
                            f"unpickled ({refusal_reason(cause)}); only load checkpoints you trust") from None
        raise UserError(f"sharded checkpoint {path} does not fit this model or is damaged "
                        f"({type(cause).__name__}: {first_line(cause)}); use another checkpoint, or the "
                        "model settings it was trained with") from None


def _root_cause(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException(failures={rank: (exc, tb)})."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
            if isinstance(inner, BaseException):
                return _root_cause(inner)
    return err


@functools.lru_cache(maxsize=None)
def _safe_dcp_classes():
    """DCP's file reader and load planner, made safe (built on first use: importing DCP
    takes a moment that runs without sharded checkpoints should not pay)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeReader(FileSystemReader):
        """Reads the index with `read_index` instead of pickle.load."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            index = read_index(Path(self.path))
            try:
                from torch.distributed.checkpoint.metadata import StorageMeta
            except ImportError:  # older torch: no storage meta to fill in
                return index
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = getattr(self, "load_id", None)
            return index

    class SafePlanner(DefaultLoadPlanner):
        """Unpickles non-tensor items with weights_only=True."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            plain = torch.load(value, weights_only=True)  # plain values only, or UnpicklingError
            # The parent class loads without restrictions: give it a re-serialised copy of
            # what passed the check, so it only ever sees bytes written here.
            vetted = io.BytesIO()
            torch.save(plain, vetted)
            vetted.seek(0)
            super().load_bytes(read_item, vetted)

    return SafeReader, SafePlanner
