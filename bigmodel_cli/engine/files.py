"""Durable writes and integrity checks for the files a run keeps (checkpoints above all).

A file appears under its name only once it is complete (written to a hidden temporary in
the same folder, fsynced, renamed), and what a reader finds is checked against the CRC-32
it was written with, so a torn, truncated or bit-flipped file is refused, never used.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

from bigmodel_cli.errors import UserError, first_line

CHUNK = 1 << 24  # 16 MiB reads: CRC-32 runs at several GB/s, so the read dominates



def user_path(value) -> Path:
    """A path setting as a shell would read it: `~` and `$VAR`/`${VAR}` expanded (a config
    file or a quoted override keeps them literal, and Hydra cannot take `~` unquoted)."""
    return Path(os.path.expandvars(os.path.expanduser(str(value))))

def atomic_write(path: Path, write: Callable) -> None:
    """Call `write(file)` on a temporary file in `path`'s folder, fsync it, then rename it
    over `path`: a crash at any moment leaves the old file or the new one, never a torn one.
    A failed write (a full disk, say) removes the temporary and raises `WriteFailed`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would (mkstemp makes it owner-only)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "writ" in str(err)):
            raise WriteFailed(path, err) from None
        raise
    fsync_dir(path.parent)  # make the rename itself durable


class WriteFailed(UserError):
    """A file could not be written (full disk, quota, read-only or vanished folder)."""

    def __init__(self, path: Path, err: BaseException):
        self.path = path
        # torch.save reports a failed write as a RuntimeError ("enforce fail ... failed
        # writing file") raised while handling the OS's error: name the OS's reason.
        cause = os_error_behind(err)
        reason = cause.strerror if cause is not None else first_line(err)
        super().__init__(f"could not write {path}: {reason} ({describe_free_space(path.parent)})")


def os_error_behind(err: Optional[BaseException]) -> Optional[OSError]:
    """The OSError that `err` is, or was raised while handling, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.strerror:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def describe_free_space(folder: Path) -> str:
    for candidate in (folder, *folder.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        return f"{free / 2**20:,.0f} MiB free on that file system"
    return "free space unknown"


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_dir(new: Path, path: Path) -> None:
    """Rename folder `new` to `path`, replacing (then deleting) whatever `path` was."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old)


# --------------------------------------------------------------------------- integrity
# CRC-32 runs at several GB/s per core and zlib releases the GIL, so spans are checked on a
# few threads at once: the check then costs about one read of the file.
WORKERS = max(1, min(8, os.cpu_count() or 1))


def crc32_span(fd: int, offset: int, size: int) -> int:
    crc, done = 0, 0
    while done < size:
        chunk = os.pread(fd, min(CHUNK, size - done), offset + done)
        if not chunk:
            raise EOFError(f"{size - done:,} bytes missing at offset {offset + done:,}")
        crc, done = zlib.crc32(chunk, crc), done + len(chunk)
    return crc


def crc32_of(path: Path) -> Tuple[int, int]:
    """(size in bytes, CRC-32) of a file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return size, crc32_span(f.fileno(), 0, size)


def digests_of(folder: Path, names: Iterable[str]) -> Dict[str, Tuple[int, int]]:
    names = list(names)
    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(names, pool.map(lambda name: crc32_of(folder / name), names)))


def check_digests(folder: Path, expected: Dict[str, Tuple[int, int]]) -> Optional[str]:
    """What is wrong with the files of `folder` against their recorded (size, CRC-32), or
    None when every one is present and intact."""
    for name, (size, _) in sorted(expected.items()):
        try:
            info = os.lstat(folder / name)
        except FileNotFoundError:
            return f"{name} is missing"
        if not stat.S_ISREG(info.st_mode):
            return f"{name} is not a plain file"
        if info.st_size != size:
            return f"{name} has {info.st_size:,} bytes, {size:,} were written"
    actual = digests_of(folder, sorted(expected))
    changed = [name for name in sorted(expected) if actual[name][1] != expected[name][1]]
    return f"{changed[0]} does not match the CRC-32 it was written with" if changed else None


def check_zip_archive(path: Path) -> Optional[str]:
    """What is wrong with a zip archive (a torch.save file), or None: every member is read
    and checked against the CRC-32 that torch.save recorded for it."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
        if any(m.compress_type != zipfile.ZIP_STORED for m in members):
            return "it has compressed members, which torch.save never writes"
        with open(path, "rb") as f:
            fd = f.fileno()
            spans = [(m, _data_offset(fd, m)) for m in members]
            with ThreadPoolExecutor(WORKERS) as pool:
                crcs = list(pool.map(lambda span: crc32_span(fd, span[1], span[0].file_size), spans))
    except zipfile.BadZipFile as err:
        return first_line(err)
    except Exception as err:  # a damaged archive fails in many ways; all mean damage here
        return f"{type(err).__name__}: {first_line(err)}"
    bad = [m.filename for m, crc in zip(members, crcs) if crc != m.CRC]
    return f"Bad CRC-32 for {bad[0]}" if bad else None


def _data_offset(fd: int, member: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose name and extra
    field lengths may differ from the central directory's."""
    header = os.pread(fd, 30, member.header_offset)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {member.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_len + extra_len


def refusal_reason(err: BaseException) -> str:
    """The line of torch's long weights_only refusal that names the offending global."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
    return (lines[0] if lines else first_line(err))[:200]
