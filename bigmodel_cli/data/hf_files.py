"""Reading Hugging Face `datasets` sources for `data=hf`, offline: a `save_to_disk`
folder, or local parquet / JSONL / JSON / CSV / text files. Only the columns asked for
leave this module, as plain Python lists per split ("train", "val", "test").

`datasets` is an optional extra (pip install 'bigmodel[datasets]'). Its Arrow files and
JSON state are data, never code; nothing here unpickles.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError, first_line

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
#: split names as data sets spell them -> ours
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}

Files = Union[str, List[str], Dict[str, Any]]


def datasets_library():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never wait on the network
    try:
        import datasets
    except ImportError:
        raise UserError("data=hf needs Hugging Face datasets: pip install 'bigmodel[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def load_splits(path: Optional[str], files: Optional[Files]) -> Dict[str, Any]:
    """Our split name -> a `datasets.Dataset`, from data.path (a save_to_disk folder) or
    data.files (a file, a list of files, or {split: files})."""
    if bool(path) == bool(files):
        raise UserError("data=hf needs exactly one of data.path=<a datasets save_to_disk folder> or "
                        "data.files=<parquet/jsonl/csv/txt files>")
    lib = datasets_library()
    loaded = load_folder(lib, path) if path else load_files(lib, files)
    if isinstance(loaded, lib.Dataset):
        return {"train": loaded}
    splits = {}
    for name, part in loaded.items():
        ours = SPLIT_NAMES.get(str(name).lower())
        if ours is None:
            raise UserError(f"the data has a split named {name!r}; name its splits train, validation and test")
        splits[ours] = part
    if "train" not in splits:
        raise UserError(f"the data has no train split (it has {', '.join(map(str, loaded))})")
    return splits


def load_folder(lib, path: str):
    folder = user_path(path)
    if not folder.is_dir():
        raise UserError(f"data.path={path} is not a folder; give a folder written by datasets' "
                        "save_to_disk, or use data.files=<files>")
    try:
        return lib.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a wrong folder
        raise UserError(f"data.path={path} is not a datasets folder ({type(err).__name__}: {first_line(err)}); "
                        "write it with Dataset.save_to_disk, or use data.files=<files>") from None


def load_files(lib, files: Files):
    by_split = {str(k): v for k, v in files.items()} if isinstance(files, dict) else {"train": files}
    paths = {split: [str(check_file(f)) for f in ([v] if isinstance(v, str) else list(v))]
             for split, v in by_split.items()}
    formats = {FORMATS.get(Path(p).suffix.lower()) for group in paths.values() for p in group}
    if None in formats or len(formats) != 1:
        raise UserError(f"data.files must all be one of {', '.join(sorted(FORMATS))} (by extension), "
                        f"not a mix; got {', '.join(sorted(Path(p).name for g in paths.values() for p in g))}")
    try:
        return lib.load_dataset(formats.pop(), data_files=paths)
    except Exception as err:  # noqa: BLE001 - pyarrow / pandas parse errors of a damaged file
        raise UserError(f"could not read data.files ({type(err).__name__}: {first_line(err)}); "
                        "check that the files are valid for their extension") from None


def check_file(name: Any) -> Path:
    path = user_path(str(name))
    if not path.is_file():
        raise UserError(f"data.files: {name} is not a file")
    if path.stat().st_size == 0:  # datasets' readers fail on it with a bare StopIteration
        raise UserError(f"data.files: {name} is empty; give files with at least one row")
    return path


def column(split: Any, name: str, role: str, where: str) -> List[Any]:
    """One column of a split as a list; a missing column is one line listing the columns."""
    if name not in split.column_names:
        raise UserError(f"data.{role}={name} is not a column of the {where} split; "
                        f"its columns are {', '.join(split.column_names)}")
    return split[name]


def source_signature(path: Optional[str], files: Optional[Files]) -> List[List[Any]]:
    """What identifies the source's content for the token cache: each file's resolved path,
    size and modification time (a folder: every file below it)."""
    if path:
        roots = [user_path(path)]
    else:
        listed = files.values() if isinstance(files, dict) else [files]
        roots = [user_path(str(f)) for v in listed for f in ([v] if isinstance(v, str) else list(v))]
    found = []
    for root in roots:
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                stat = f.stat()
                found.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return found
