"""Writing files safely: every file rnngen writes goes through atomic_file (temporary file, fsync,
rename, fsync of the directory), so a reader sees the old content or the new, never a mix, and a
failed write leaves no temporary file behind. Runs the same on Linux, macOS and Windows."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from rnngen.errors import ModelError


def write_error(path: Path, exc: OSError) -> ModelError:
    """The one message for a write that failed (disk full, no permission, read-only file system, ...)."""
    return ModelError(f"cannot write {path}: {exc.strerror or exc}; its previous version (if any) is untouched")


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` only when the block ends without an error."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):  # POSIX (and Windows from Python 3.13): mkstemp makes 0600
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_file(path) as f:
        f.write(data)


def append_line(path: Path, line: str) -> None:
    """Append one line of UTF-8 text (a log such as metrics.jsonl)."""
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise write_error(path, exc) from None


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable. Directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename itself still happened
        pass
    finally:
        os.close(fd)
