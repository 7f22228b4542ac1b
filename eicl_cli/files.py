"""Reading and writing the files eicl keeps, with every failure of the
filesystem as one EiclError naming the file: a file that is not UTF-8
text, a folder where a file belongs, a full disk.

A write goes to a temporary name beside the file, is flushed to the disk and
renamed over it, so a reader sees the old file or the new one, never half of
either; when the write fails the temporary file is removed, whatever the
failure, so a full disk leaves nothing behind to fill it further.

Pure Python, without JAX.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import EiclError


def reason(e: OSError) -> str:
    """Why a read or write failed, for a one-line message."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free some space, then run the command again)"
    if e.errno == errno.EFBIG:
        return "the file would exceed the size this process may write (ulimit -f)"
    if e.errno == errno.EISDIR:
        return "a folder is in the way: a file belongs there"
    return e.strerror or type(e).__name__


def read_text(path: Path, what: str) -> str:
    """A text file's contents, or an EiclError naming it and what is wrong:
    missing, a folder, unreadable, or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EiclError(f"{what} {path} is not UTF-8 text (byte {e.start} is "
                        f"{e.object[e.start:e.start + 1]!r}); it must be UTF-8") from None
    except FileNotFoundError:
        raise EiclError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise EiclError(f"{what} {path} is a folder; a file belongs there") from None
    except OSError as e:
        raise EiclError(f"cannot read {what} {path}: {reason(e)}") from None


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse dir fsync)."""
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename: readers never
    see half a file, and a failed write leaves neither half a file nor its
    temporary. The temporary name is unique to this write (`.NAME.*.tmp`,
    which runs.remove_stale_temp_files finds), so two processes writing one
    file at once (two `prepare-data` on a lab's data folder, two sweeps
    started together) never write into each other's bytes; the file gets the
    mode an ordinary open() would give it."""
    path = Path(path)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise EiclError(f"cannot write {path}: {reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_text(path: Path, text: str) -> None:
    """Append and flush (a crash loses at most this text); a failure is one line."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
    except OSError as e:
        raise EiclError(f"cannot write {path}: {reason(e)}") from None
