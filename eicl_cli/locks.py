"""One writer per folder: a lock file holding its owner's host and pid.

`eicl sweep` holds SWEEP_OUT/.sweep.lock and `eicl train` (and a stacked
trainer) RUN/.train.lock while they write, so a second process started on the
same folder (a job submitted twice, a manual --resume beside a sweep) is
refused instead of interleaving metrics and pruning the other's checkpoints.
A lock left by a process that died is taken over when its owner was on this
host; one from another host (a shared filesystem) cannot be checked from here,
so the error says which file to delete once that process is known to be gone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from .errors import EiclError


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """Context manager: hold `path` (a file in the folder) or raise EiclError
    naming `what` and the owner."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what

    def _owner(self) -> tuple[str | None, int]:
        try:
            parts = self.path.read_text().split()
        except OSError:
            return None, 0
        try:
            if len(parts) == 1:  # written by an older eicl: a pid on this host
                return None, int(parts[0])
            return parts[0], int(parts[1])
        except (IndexError, ValueError):
            return None, 0

    def __enter__(self) -> "FolderLock":
        host = socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner_host, pid = self._owner()
                if owner_host not in (None, host):
                    raise EiclError(
                        f"{self.what} is in use by pid {pid} on host {owner_host}; wait for it, "
                        f"or delete {self.path} if that process is gone") from None
                if pid_alive(pid) and pid != os.getpid():
                    raise EiclError(f"{self.what} is in use by pid {pid}; wait for it to end "
                                    "or stop it first") from None
                self.path.unlink(missing_ok=True)  # its owner died: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{host} {os.getpid()}\n")
            return self
        raise EiclError(f"could not take the lock {self.path}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)
