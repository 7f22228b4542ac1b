"""`eicl` with checkpoint writes that pause half-way, so that a test can kill
the process with half a file written: `python slow_checkpoint_writes.py
SECONDS[@STEP] ARGS...` pauses SECONDS in the write of every checkpoint (or
only step STEP's), then runs `eicl ARGS...`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from eicl_cli import checkpoint, runs
from eicl_cli.cli import run_app


def main() -> None:
    seconds, _, only = sys.argv[1].partition("@")

    def write_slowly(path: Path, data: bytes) -> None:
        path = Path(path)
        step = int(path.name.split("_")[1].split(".")[0])
        if only and int(only) != step:
            return runs.atomic_write_bytes(path, data)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            time.sleep(float(seconds))
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    checkpoint.atomic_write_bytes = write_slowly
    sys.exit(run_app(sys.argv[2:]))


if __name__ == "__main__":
    main()
