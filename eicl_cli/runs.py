"""The run folder: where a training run keeps its config, metrics and checkpoints.

Layout (every other part reads runs through these helpers)::

    RUN/config.toml                         the resolved config (config.to_toml)
    RUN/metrics.jsonl                       one JSON object per line, see below
    RUN/checkpoints/step_00001000.safetensors
    RUN/environment.jsonl                   what each start or resume ran on (environment.py)
    RUN/.train.lock                         host and pid of the process training it

metrics.jsonl records:
    {"kind": "train", "step", "time", "steps_per_s", "lr", "loss", <metric>...}
    {"kind": "eval",  "step", "time", "mode", "sequences", <metric>...}
`step` is the number of updates done when the record was written; `time` is
wall-clock seconds since the run first started (continued across resumes).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from . import config as config_mod
from .errors import EiclError
from .locks import FolderLock

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TRAIN_LOCK = ".train.lock"
ENVIRONMENT_FILE = "environment.jsonl"
_CKPT_RE = re.compile(r"^step_(\d{8})\.safetensors$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def train_lock(run_dir: Path) -> FolderLock:
    """Held while a process trains the run: a second trainer is refused."""
    return FolderLock(Path(run_dir) / TRAIN_LOCK, f"run {run_dir}")


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


def run_name(config_path: str | Path | None, cfg: config_mod.Config,
             now: float | None = None) -> str:
    """run.name if set, else '<config stem>-<YYYYmmdd-HHMMSS>'."""
    if cfg.run.name:
        return cfg.run.name
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def new_run_dir(cfg: config_mod.Config, config_path: str | Path | None,
                out: str | Path | None = None) -> Path:
    """Create the folder for a new run: --out if given, else run.out_dir/<name>.

    An existing folder is only reused when it is empty, so a run never writes
    over another run's checkpoints."""
    if out is not None:
        path = Path(out)
    else:
        base = Path(cfg.run.out_dir) / run_name(config_path, cfg)
        path, n = base, 1
        while path.exists():  # two runs started in the same second
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise EiclError(f"--out {path} already exists and is not empty; "
                        f"continue it with --resume {path} or choose another folder")
    make_dir(path / CHECKPOINT_DIR, "run folder")
    return path


def make_dir(path: Path, what: str) -> None:
    """mkdir -p, with a folder that cannot be made (a file in the way, no
    permission) as one EiclError naming it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EiclError(f"cannot create the {what} {path}: {e.strerror}") from None


def write_config(run_dir: Path, cfg: config_mod.Config) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG_FILE, config_mod.to_toml(cfg).encode())


def read_config(run_dir: Path) -> config_mod.Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise EiclError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}")
    return config_mod.from_toml(path.read_text())


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


# ---------------------------------------------------------------- metrics

def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one record as a JSON line (flushed, so a crash loses at most it)."""
    line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False)
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(line + "\n")
        f.flush()


def append_environment(run_dir: Path, record: dict) -> None:
    """Append what this start or resume of the run ran on."""
    with open(Path(run_dir) / ENVIRONMENT_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    """Every JSON line of `path` ([] if absent); a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_environment(run_dir: Path) -> list[dict]:
    return _read_jsonl(Path(run_dir) / ENVIRONMENT_FILE)


def read_metrics(run_dir: Path, kind: str | None = None,
                 mode: str | None = None) -> list[dict]:
    """All records (optionally only one kind / eval mode), in file order.

    A last line cut short by a crash is ignored. `run_dir` may also be a
    metrics file itself (a run's copy, as in docs/results)."""
    path = Path(run_dir)
    path = path if path.is_file() else path / METRICS_FILE
    return [rec for rec in _read_jsonl(path)
            if (kind is None or rec.get("kind") == kind)
            and (mode is None or rec.get("mode") == mode)]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records written after `step` (a resume replays those steps)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


# ---------------------------------------------------------------- checkpoints

def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first (temp files excluded)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def iter_newest_first(run_dir: Path) -> Iterator[tuple[int, Path]]:
    yield from reversed(list_checkpoints(run_dir))


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete *.tmp left by a process killed mid-write; returns what was removed."""
    removed = []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for p in folder.glob("*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
