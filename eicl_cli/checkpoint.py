"""Checkpoints as named tensors in one safetensors file (no pickle).

A checkpoint holds the model's arrays ("params.*"), the batch-norm state
("state.*"), the optimizer state ("opt.*") and, in its metadata, the format
name and version, the step, the resolved config as TOML text, a SHA-256 of
all tensor bytes (so bit rot and torn copies are caught, not only
truncation) and whether it is a run's final checkpoint.

Loading never trusts the file for structure: the caller rebuilds the pytree
skeleton from the config (build_model + optimizer init) and each leaf is
filled by name, refusing any missing, extra or mis-shaped tensor with one
line naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy as st
from safetensors import SafetensorError, safe_open

from . import config as config_mod
from .config import Config
from .errors import EiclError, first_line
from .experiment_keys import continuation_difference, flat
from .files import atomic_write_bytes, reason

FORMAT = "eicl-checkpoint"
VERSION = "1"
# The metadata "kind" of a checkpoint kept for training dynamics: the
# weights evaluation uses (the moving average, if the run keeps one) and the
# batch-norm state, no optimizer state; it cannot resume a run.
DYNAMICS = "dynamics"


class CheckpointError(EiclError):
    """A checkpoint that cannot be used: corrupt, truncated, or not matching the config."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint written for a different model or optimizer config."""


class CheckpointVanished(CheckpointError):
    """A checkpoint that is not there (any more): listed, then pruned."""


@dataclass
class Loaded:
    model: Any
    state: Any
    opt_state: Any
    step: int
    metadata: dict[str, str]


# ---------------------------------------------------------------- naming

def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _named_leaves(prefix: str, tree: Any) -> list[tuple[str, Any]]:
    """Flatten a pytree to (stable dotted name, array) pairs; non-arrays skipped."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return [(".".join([prefix] + [_key_name(k) for k in path]), leaf) for path, leaf in leaves]


def _to_numpy(x: Any) -> np.ndarray:
    a = np.asarray(x)
    # safetensors' NumPy reader has no bfloat16: store it widened (exactly).
    return a.astype(np.float32) if a.dtype == jnp.bfloat16 else a


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- save

def save(path: Path, *, step: int, model: Any, state: Any, opt_state: Any,
         config_toml: str, final: bool = False, extra: dict[str, str] | None = None) -> None:
    """Write a checkpoint atomically: temp file, fsync, rename, fsync the folder.
    `extra` adds string metadata (e.g. the run's elapsed wall time)."""
    tensors: dict[str, np.ndarray] = {}
    for prefix, tree in (("params", model), ("state", state), ("opt", opt_state)):
        for name, leaf in _named_leaves(prefix, tree):
            if name in tensors:  # two leaves mapping to one name would lose data
                raise RuntimeError(f"duplicate checkpoint tensor name {name}")
            tensors[name] = _to_numpy(leaf)
    metadata = {"format": FORMAT, "version": VERSION, "step": str(int(step)),
                "config": config_toml, "final": "true" if final else "false",
                "sha256": _digest(tensors), **(extra or {})}
    atomic_write_bytes(Path(path), st.save(tensors, metadata=metadata))


# ---------------------------------------------------------------- load

def _check_metadata(meta: dict[str, str], path: Path) -> dict[str, str]:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eicl checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; "
                              f"this eicl reads version {VERSION}")
    return meta


def _unreadable(path: Path, detail: str) -> CheckpointError:
    if path.suffix != ".safetensors":
        return CheckpointError(f"{path} is not a checkpoint: give a run folder or one of "
                               f"its checkpoints/step_*.safetensors")
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({detail})")


def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata only (cheap); CheckpointError if unreadable or foreign."""
    path = Path(path)
    if not path.exists():
        raise CheckpointVanished(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; a checkpoint is a .safetensors file")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, first_line(e)) from None
    return _check_metadata(meta, path)


@dataclass
class Snapshot:
    """A checkpoint file's bytes, read once: whatever happens to the file
    afterwards (the trainer beside an `eicl eval` pruning it, say), its
    metadata and tensors are the ones read."""
    path: Path
    data: bytes
    metadata: dict[str, str]


def read_snapshot(path: Path) -> Snapshot:
    """Read a checkpoint whole and check its header; CheckpointVanished when
    the file is not there (any more), CheckpointError when it is unusable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointVanished(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; a checkpoint is a .safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {reason(e)}") from None
    # The safetensors layout: an 8-byte little-endian header length, then the
    # JSON header, whose "__metadata__" holds the string metadata.
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < n <= len(data) - 8:
            raise ValueError("the header length does not fit the file")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a table")
    except (ValueError, AttributeError) as e:
        raise _unreadable(path, first_line(e)) from None
    return Snapshot(path, data, _check_metadata(meta, path))


def recorded_config(snapshot: Snapshot) -> Config:
    """The resolved config the checkpoint was written with."""
    try:
        return config_mod.from_toml(snapshot.metadata.get("config", ""))
    except EiclError as e:
        raise CheckpointError(f"checkpoint {snapshot.path}: the config recorded in it cannot "
                              f"be read ({e})") from None


def check_config(snapshot: Snapshot, cfg: Config, source: str, advice: str) -> None:
    """Refuse, in one line naming the keys (and ending in `advice`), a
    checkpoint written under a config that differs from `cfg` (the run's,
    as `source` names it) in a key that changes what the run computes; the
    keys a run may change as it continues (its length and intervals, its
    evaluation, where it writes, how it is compiled) may differ."""
    recorded = recorded_config(snapshot)
    keys = continuation_difference(recorded, cfg)
    if keys:
        there, here = flat(recorded), flat(cfg)
        shown = "; ".join(f"{k} = {there.get(k)!r} there, {here.get(k)!r} here"
                          for k in keys[:4])
        more = f" (and {len(keys) - 4} more keys)" if len(keys) > 4 else ""
        raise CheckpointMismatch(f"checkpoint {snapshot.path} was trained under another config "
                                 f"than {source}: {shown}{more}; {advice}")


def _read_tensors(source: Path | Snapshot) -> tuple[dict[str, np.ndarray], dict[str, str], Path]:
    snapshot = source if isinstance(source, Snapshot) else read_snapshot(source)
    path = snapshot.path
    try:
        tensors = st.load(snapshot.data)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if _digest(tensors) != snapshot.metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match "
                              "the checksum stored in it")
    return tensors, snapshot.metadata, path


def _is_tensor_slot(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _fill(prefix: str, skeleton: Any, tensors: dict[str, np.ndarray], path: Path) -> Any:
    """Return `skeleton` with each array leaf replaced by the tensor of the same name.
    A leaf may also be a jax.ShapeDtypeStruct (a skeleton from jax.eval_shape),
    so nothing needs allocating just to be overwritten."""
    arrays, static = eqx.partition(skeleton, _is_tensor_slot)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    new_leaves = []
    for keypath, leaf in flat:
        name = ".".join([prefix] + [_key_name(k) for k in keypath])
        if name not in tensors:
            raise CheckpointMismatch(f"checkpoint {path} has no tensor {name}; it was written "
                                  "for a different model or optimizer config")
        value = tensors.pop(name)
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointMismatch(
                f"checkpoint {path}: tensor {name} has shape {tuple(value.shape)} but the "
                f"config's model needs {tuple(leaf.shape)}")
        new_leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    arrays = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return eqx.combine(arrays, static)


def load(source: Path | Snapshot, *, model: Any, state: Any,
         opt_state: Any | None = None) -> Loaded:
    """Fill the given skeletons from a checkpoint file (or its bytes, read
    before). With opt_state=None the optimizer tensors are ignored
    (evaluation needs only the model)."""
    tensors, meta, path = _read_tensors(source)
    model = _fill("params", model, tensors, path)
    state = _fill("state", state, tensors, path)
    if opt_state is not None:
        opt_state = _fill("opt", opt_state, tensors, path)
    else:
        for name in [n for n in tensors if n.startswith("opt.")]:
            del tensors[name]
    if tensors:
        extra = sorted(tensors)[0]
        raise CheckpointMismatch(f"checkpoint {path} has tensor {extra} that the config's model "
                              f"does not have ({len(tensors)} extra in all)")
    return Loaded(model, state, opt_state, int(meta["step"]), meta)


def is_dynamics(snapshot: Snapshot) -> bool:
    return snapshot.metadata.get("kind") == DYNAMICS


def is_final(path: Path) -> bool:
    try:
        return read_metadata(path).get("final") == "true"
    except CheckpointError:
        return False


def prune(checkpoints: list[tuple[int, Path]], keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, never a run's final one.
    `checkpoints` is runs.list_checkpoints(...) (oldest first); returns the deleted."""
    candidates = checkpoints[:-keep] if keep > 0 else list(checkpoints)
    removed = []
    for _, p in candidates:
        if not is_final(p):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


T = TypeVar("T")

# How often one search may find its candidate gone (pruned by the trainer
# beside it) before giving up: each time, the folder is listed again.
_RELISTS = 100


def load_newest(list_candidates: Callable[[], Iterable[tuple[int, Path]]], folder: Path,
                warn: Callable[[str], None], load: Callable[[Path], T]) -> T | None:
    """What `load` makes of the first of a run's checkpoints (newest first,
    as `list_candidates()` gives them) that is intact: a corrupt one is
    skipped with `warn`; one written for another model or config
    (CheckpointMismatch) stops the search, so that a changed config never
    silently goes back to an older checkpoint; one that has vanished since
    the folder was listed (a trainer pruning it) is no fault: the folder is
    listed again, for the newer one that took its place. None when there are
    none; EiclError when every one is corrupt."""
    tried: set[Path] = set()
    corrupt = 0
    for _ in range(_RELISTS):
        for _, path in list_candidates():
            if path in tried:
                continue
            tried.add(path)
            try:
                return load(path)
            except CheckpointVanished:
                break
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                warn(f"skipping {path.name}: {e}")
                corrupt += 1
        else:
            break
    else:
        raise EiclError(f"the checkpoints in {folder} kept vanishing before they could be read; "
                        "is another process deleting them?")
    if corrupt:
        raise EiclError(f"no intact checkpoint in {folder} ({corrupt} corrupt)")
    return None
