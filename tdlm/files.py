"""Writing files so that a fault never loses what was there: the one way tdlm writes run
directories (config, environment, data record, metrics, summary, checkpoints and their
pointers), its caches, prepared shards, exported folders and the reports of its studies.

`write_atomically(path, data)` writes to a temporary file in `path`'s folder, flushes it to the
disk, renames it over `path`, then flushes the folder. A kill at any moment leaves the old file
or the whole new one (at worst also a stray `.NAME.XXXXXXXX.tmp`, which `remove_temporaries`
clears); any failure removes the temporary file and leaves `path` as it was. `append_line` adds
a line whole or not at all. A folder that must appear whole (a checkpoint, an exported model)
is assembled beside its place, each file by write_atomically, and put there by `rename_folder`.
Every OSError of these (a full disk, a quota, a read-only folder, a missing permission) becomes
one WriteError line naming the folder and the fix.

Serializers write into the open file (`data` may be a function of it), never to a path of their
own: their own writers report a full disk as their own error types (safetensors'
SafetensorError, torch.save's RuntimeError), which no handler of OSError would see.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from tdlm.errors import WriteError

TEMP_SUFFIX = ".tmp"
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NOT_ALLOWED = {errno.EACCES, errno.EPERM}


def describe(exc: OSError, folder: Path) -> tuple[str, str]:
    """(what went wrong writing in `folder`, what to do about it), in words."""
    if exc.errno in NO_SPACE:
        return f"no space left in {folder} (disk full or over quota)", "free some space"
    if exc.errno == errno.EROFS:
        return f"{folder} is on a read-only file system", "make it writable or write elsewhere"
    if exc.errno in NOT_ALLOWED:
        return f"no permission to write in {folder}", "make it writable or write elsewhere"
    return f"cannot write in {folder} ({exc.strerror or exc})", "fix the folder"


def write_error(exc: OSError, path: Path) -> WriteError:
    """The one-line error of a failed write of `path` (one already a WriteError stays as it is)."""
    if isinstance(exc, WriteError):
        return exc
    what, fix = describe(exc, path.parent)
    return WriteError(f"{what}: {path.name} was not written (the file as it was is kept); {fix}, then try again",
                      path=path, what=what, fix=fix, errno=exc.errno)


def write_atomically(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Replace `path` by `data` (bytes, text as UTF-8, or a function that writes into the open
    binary file), atomically and durably. WriteError on any OSError; `path` is then unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise write_error(exc, path) from exc
    try:
        with open(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; caches may be shared
        os.replace(tmp, path)
    except BaseException as exc:  # a signal's exception too: no temporary file is left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(exc, path) from exc
        raise
    fsync_dir(path.parent)


def rename_folder(staging: str | Path, path: str | Path) -> None:
    """Put the folder `staging` (assembled beside `path`, its files written by write_atomically,
    so already on the disk) in place of `path` (absent, or an empty folder) with one rename, then
    flush the parent folder: a kill at any moment leaves no folder or the whole one. WriteError
    on any OSError; `staging` is then left for the caller to remove."""
    staging, path = Path(staging), Path(path)
    try:
        os.replace(staging, path)
    except OSError as exc:
        raise write_error(exc, path) from exc
    fsync_dir(path.parent)


def append_line(path: str | Path, line: str) -> None:
    """Add `line` (and a newline) at the end of `path`: whole, or (on any failure) not at all."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            size = f.tell()
            try:
                f.write(line + "\n")
                f.flush()
            except BaseException:
                with contextlib.suppress(OSError):  # drop the part that did reach the file
                    f.truncate(size)
                raise
    except OSError as exc:
        raise write_error(exc, path) from exc


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of writes a kill cut short in `folder` (only files named as
    write_atomically names them); returns them. Call it only where no other process writes."""
    removed = []
    for path in Path(folder).glob(f".*.*{TEMP_SUFFIX}"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
