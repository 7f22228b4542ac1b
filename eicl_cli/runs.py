"""The run folder: where a training run keeps its config, metrics and checkpoints.

Layout (every other part reads runs through these helpers)::

    RUN/config.toml                         the resolved config (config.to_toml)
    RUN/metrics.jsonl                       one JSON object per line, see below
    RUN/checkpoints/step_00001000.safetensors   rolling, for resuming (keep_checkpoints)
    RUN/dynamics/step_00000562.safetensors      kept for training dynamics, never pruned
    RUN/environment.jsonl                   what each start or resume ran on (environment.py)
    RUN/.train.lock                         host and pid of the process training it

metrics.jsonl records:
    {"kind": "train", "step", "time", "steps_per_s", "lr", "loss", <metric>...}
    {"kind": "eval",  "step", "time", "mode", "sequences", <metric>...}
`step` is the number of updates done when the record was written; `time` is
wall-clock seconds since the run first started (continued across resumes).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

from . import config as config_mod
from .errors import EiclError
from .files import append_text, atomic_write_bytes, fsync_dir, read_text, reason
from .locks import FolderLock

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
DYNAMICS_DIR = "dynamics"
TRAIN_LOCK = ".train.lock"
ENVIRONMENT_FILE = "environment.jsonl"
# At least 8 digits: steps from 10^8 on take more, and still match.
_CKPT_RE = re.compile(r"^step_(\d{8,})\.safetensors$")


def train_lock(run_dir: Path) -> FolderLock:
    """Held while a process trains the run: a second trainer is refused."""
    return FolderLock(Path(run_dir) / TRAIN_LOCK, f"run {run_dir}")


def run_name(config_path: str | Path | None, cfg: config_mod.Config,
             now: float | None = None) -> str:
    """run.name if set, else '<config stem>-<YYYYmmdd-HHMMSS>'."""
    if cfg.run.name:
        return cfg.run.name
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def new_run_dir(cfg: config_mod.Config, config_path: str | Path | None,
                out: str | Path | None = None) -> Path:
    """Create the folder for a new run, holding its config.toml: --out if
    given, else run.out_dir/<name>.

    An existing folder is only reused when it is empty, so a run never writes
    over another run's checkpoints. The folder is made under a temporary name
    beside it and renamed into place whole: a process killed while making it
    leaves no folder that is neither empty nor a run."""
    if out is not None:
        path = Path(out)
    else:
        base = Path(cfg.run.out_dir) / run_name(config_path, cfg)
        path, n = base, 1
        while path.exists():  # two runs started in the same second
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise _not_empty(path)
    make_dir(path.parent, "run folder", path)
    staging = path.parent / f".{path.name}.{os.getpid()}.new"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # this pid's, from a process long gone
        make_dir(staging / CHECKPOINT_DIR, "run folder", path)
        write_config(staging, cfg)
        try:
            # Over an empty folder (--out made beforehand) too; never over a full one.
            os.rename(staging, path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise _not_empty(path) from None
            raise EiclError(f"cannot create the run folder {path}: {reason(e)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(path.parent)
    return path


def _not_empty(path: Path) -> EiclError:
    return EiclError(f"--out {path} already exists and is not empty; "
                     f"continue it with --resume {path} or choose another folder")


def discard_unstarted(run_dir: Path) -> bool:
    """Remove a new run's folder that a failure before its first step left
    holding only its config (an out-of-memory model, say), so that the same
    --out can start it again; a folder holding anything more is kept.
    Returns whether it was removed."""
    run_dir, ckpt_dir = Path(run_dir), checkpoint_dir(run_dir)
    try:
        entries = {p.name for p in run_dir.iterdir()}
        ckpts = list(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []
    except OSError:
        return False
    if ckpts or not entries <= {CONFIG_FILE, CHECKPOINT_DIR}:
        return False
    try:
        (run_dir / CONFIG_FILE).unlink(missing_ok=True)
        if ckpt_dir.is_dir():
            ckpt_dir.rmdir()
        run_dir.rmdir()
    except OSError:
        return False
    return True


def make_dir(path: Path, what: str, named: Path | None = None) -> None:
    """mkdir -p, with a folder that cannot be made (a file in the way, no
    permission) as one EiclError naming it (or `named`, the folder it is for)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EiclError(f"cannot create the {what} {named or path}: {e.strerror}") from None


# The first line of every config.toml eicl writes: a checksum of the rest, so
# that a file cut short or changed by hand is told from the config the run
# was started (or last resumed) with.
_DIGEST_LINE = "# written by eicl; sha256 of the lines below: "
_DIGEST_RE = re.compile(re.escape(_DIGEST_LINE) + r"([0-9a-f]{64})")


def config_text(cfg: config_mod.Config) -> str:
    """config.toml as a run folder holds it (and `train --print-config` prints it)."""
    body = config_mod.to_toml(cfg)
    return f"{_DIGEST_LINE}{hashlib.sha256(body.encode()).hexdigest()}\n{body}"


def write_config(run_dir: Path, cfg: config_mod.Config) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG_FILE, config_text(cfg).encode())


def read_config(run_dir: Path, overrides: list[str] | None = None) -> config_mod.Config:
    """The run's config (with --set `overrides`); see read_config_file."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise EiclError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}")
    return read_config_file(path, overrides)


def read_config_file(path: Path, overrides: list[str] | None = None) -> config_mod.Config:
    """A run's config.toml (or a copy of it), refused in one line when it is
    damaged: not the text eicl wrote (cut short, edited), or, from an eicl
    that wrote no checksum, missing a section that every run's config has.
    Such a file is never filled in with defaults."""
    text = read_text(path, "run config")
    first, _, body = text.partition("\n")
    signed = _DIGEST_RE.fullmatch(first)
    again = "restore it, or start the run again in a new folder"
    if signed and hashlib.sha256(body.encode()).hexdigest() != signed.group(1):
        raise EiclError(f"{path} is damaged: it differs from what eicl wrote (its checksum does "
                        f"not match: cut short or edited by hand); {again} (a resume takes "
                        "new settings from --set, not from an edited file)")
    try:
        raw = tomllib.loads(body if signed else text)
    except tomllib.TOMLDecodeError as e:
        raise EiclError(f"{path} is damaged: TOML syntax error ({e}); {again}") from None
    if not signed:
        missing = [s for s in config_mod.to_dict(config_mod.Config()) if s not in raw]
        if missing:
            raise EiclError(f"{path} is damaged: it has no [{missing[0]}] section, which every "
                            f"run's config has (cut short?); {again}")
    return config_mod.from_dict(config_mod.apply_overrides(raw, overrides or []))


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
    append_text(Path(run_dir) / METRICS_FILE, line + "\n")


def append_environment(run_dir: Path, record: dict) -> None:
    """Append what this start or resume of the run ran on."""
    append_text(Path(run_dir) / ENVIRONMENT_FILE, json.dumps(record) + "\n")


def _read_jsonl(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) of every JSON line of `path` ([] if absent); a
    line cut short by a crash is skipped."""
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def read_environment(run_dir: Path) -> list[dict]:
    return [rec for _, rec in _read_jsonl(Path(run_dir) / ENVIRONMENT_FILE, "environment file")
            if isinstance(rec, dict)]


def check_metrics_record(path: Path, number: int, rec: Any) -> dict:
    """A metrics line as the layout above has it, else one EiclError naming
    the line and the value: the readers do arithmetic on every field but
    `kind` and `mode`."""
    where = f"{path} line {number}"
    if not isinstance(rec, dict):
        raise EiclError(f"{where} is {rec!r}; each line must be a JSON object (a record)")
    for key, value in rec.items():
        if key in ("kind", "mode"):
            if not isinstance(value, str):
                raise EiclError(f"{where}: {key} is {value!r}; it must be a string")
        elif key == "step":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EiclError(f"{where}: step is {value!r}; it must be a whole number >= 0")
        elif value is not None and (isinstance(value, bool)
                                    or not isinstance(value, (int, float))):
            raise EiclError(f"{where}: {key} is {value!r}; it must be a number (or null)")
    return rec


def read_metrics(run_dir: Path, kind: str | None = None,
                 mode: str | None = None) -> list[dict]:
    """All records (optionally only one kind / eval mode), in file order.

    A last line cut short by a crash is ignored; a record holding a value
    of the wrong type is refused in one line. `run_dir` may also be a
    metrics file itself (a run's copy, as in docs/results)."""
    path = Path(run_dir)
    path = path if path.is_file() else path / METRICS_FILE
    records = [check_metrics_record(path, n, rec) for n, rec in _read_jsonl(path, "metrics file")]
    return [rec for rec in records
            if (kind is None or rec.get("kind") == kind)
            and (mode is None or rec.get("mode") == mode)]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records written after `step` (a resume replays those steps)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


# ---------------------------------------------------------------- checkpoints

def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _step_file(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / _step_file(step)


def dynamics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DYNAMICS_DIR


def dynamics_path(run_dir: Path, step: int) -> Path:
    return dynamics_dir(run_dir) / _step_file(step)


def list_dynamics(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints kept for training dynamics, oldest first."""
    return _list_steps(dynamics_dir(run_dir))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first (temp files excluded)."""
    return _list_steps(checkpoint_dir(run_dir))


def _list_steps(folder: Path) -> list[tuple[int, Path]]:
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
    for folder in (checkpoint_dir(run_dir), dynamics_dir(run_dir)):
        if folder.is_dir():
            for p in folder.glob("*.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
