"""One writer per folder: an operating-system lock on a file in that folder.

`eicl sweep` holds SWEEP_OUT/.sweep.lock and `eicl train` (and a stacked
trainer) RUN/.train.lock while they write, so a second process started on the
same folder (a job submitted twice, a manual --resume beside a sweep) is
refused instead of interleaving metrics and pruning the other's checkpoints.

What is promised. The exclusion is flock(2) on the lock file: the kernel
holds it while the holder's descriptor is open and drops it when the holder
ends, however it ends (a crash, kill -9), so a lock left by a dead process is
free at once and, on a local filesystem, two processes never hold one lock
together. The holder writes its host and pid into the file once it holds the
lock; the text only names the owner in a refusal. On release the holder
removes the file while still holding it; a rival that opened the file just
before checks, once it holds the lock, that the name still leads to the file
it locked, and starts again if not.

Network filesystems. flock excludes processes on different hosts only where
the filesystem passes it on (Linux NFSv4 does, emulating it with a byte-range
lock; Lustre mounted with `flock` does); on an NFSv3 mount with `nolock` or
`local_lock`, or a filesystem that ignores locks, it excludes processes of one
host only. So the file's text is checked as well: a lock file naming a process
on another host is refused even when flock is free here, with the file to
delete once that process is known to be gone, and one naming a live process
on this host (an older eicl, which locked by the file alone) is refused too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import EiclError

# Tries to lock a file that the holder removes between our open and our lock.
_ATTEMPTS = 100
# A rival that reads the file while a new holder writes it sees it empty or
# naming the previous, dead owner: it reads again for this long.
_READ_RETRY_S = 0.05


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this host."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse_owner(text: str) -> tuple[str | None, int]:
    """(host, pid) from a lock file's text; (None, pid) for a pid alone (an
    older eicl's, on this host); (None, 0) when it names nobody."""
    parts = text.split()
    try:
        if len(parts) == 1:
            return None, int(parts[0])
        return parts[0], int(parts[1])
    except (IndexError, ValueError):
        return None, 0


class FolderLock:
    """Context manager: hold `path` (a file in the folder) or raise EiclError
    naming `what` and the owner."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def _is_at_path(self, fd: int) -> bool:
        """Whether the open file `fd` is still the file at self.path."""
        mine = os.fstat(fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def _read_owner(self) -> tuple[str | None, int]:
        try:
            return _parse_owner(self.path.read_bytes().decode(errors="replace"))
        except OSError:
            return None, 0

    def _in_use(self, host: str) -> EiclError:
        """The refusal when another process holds the flock."""
        deadline = time.monotonic() + _READ_RETRY_S
        while True:
            owner_host, pid = self._read_owner()
            named = pid and (owner_host not in (None, host) or pid_alive(pid))
            if named or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if not named:
            return EiclError(f"{self.what} is in use by another process; wait for it to end "
                             "or stop it first")
        if owner_host not in (None, host):
            return EiclError(f"{self.what} is in use by pid {pid} on host {owner_host}; "
                             "wait for it to end or stop it first")
        return EiclError(f"{self.what} is in use by pid {pid}; wait for it to end "
                         "or stop it first")

    def _refuse_by_text(self, fd: int, host: str) -> EiclError | None:
        """The refusal a file's text calls for although flock is free here:
        its owner is on another host, or is a live process of an older eicl."""
        owner_host, pid = _parse_owner(os.pread(fd, 4096, 0).decode(errors="replace"))
        if owner_host not in (None, host):
            return EiclError(
                f"{self.what} is in use by pid {pid} on host {owner_host}; wait for it, "
                f"or delete {self.path} if that process is gone")
        if pid_alive(pid) and pid != os.getpid():
            return EiclError(f"{self.what} is in use by pid {pid}; wait for it to end "
                             "or stop it first")
        return None

    def __enter__(self) -> "FolderLock":
        host = socket.gethostname()
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._in_use(host) from None
                raise EiclError(f"cannot lock {self.path} ({e.strerror}); this filesystem "
                                "does not support file locks") from None
            if not self._is_at_path(fd):
                os.close(fd)  # its holder removed it after we opened it: open the new one
                continue
            refusal = self._refuse_by_text(fd, host)
            if refusal is not None:
                os.close(fd)
                raise refusal
            # Written over the old text before cutting it to length, so a rival
            # reading meanwhile never sees an empty file.
            text = f"{host} {os.getpid()}\n".encode()
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
            self._fd = fd
            return self
        raise EiclError(f"could not take the lock {self.path}: it was removed and made "
                        f"again {_ATTEMPTS} times while trying")

    def __exit__(self, *exc: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still held, and only if it is still ours; a rival
            # that opened it meanwhile sees it gone once it holds it.
            if self._is_at_path(fd):
                self.path.unlink(missing_ok=True)
        finally:
            # Unlocked explicitly: a process forked meanwhile shares the
            # descriptor, and closing ours alone would leave it locked.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
