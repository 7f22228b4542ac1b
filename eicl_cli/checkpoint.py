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

from .errors import EiclError
from .runs import atomic_write_bytes

FORMAT = "eicl-checkpoint"
VERSION = "1"


class CheckpointError(EiclError):
    """A checkpoint that cannot be used: corrupt, truncated, or not matching the config."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint written for a different model or optimizer config."""


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

def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata only (cheap); CheckpointError if unreadable or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a checkpoint: give a run folder or one of "
                                  f"its checkpoints/step_*.safetensors") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eicl checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; "
                              f"this eicl reads version {VERSION}")
    return meta


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    meta = read_metadata(path)
    try:
        tensors = st.load(Path(path).read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match "
                              "the checksum stored in it")
    return tensors, meta


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


def load(path: Path, *, model: Any, state: Any, opt_state: Any | None = None) -> Loaded:
    """Fill the given skeletons from a checkpoint. With opt_state=None the
    optimizer tensors are ignored (evaluation needs only the model)."""
    path = Path(path)
    tensors, meta = _read_tensors(path)
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


def load_newest(candidates: Iterable[tuple[int, Path]], folder: Path,
                warn: Callable[[str], None], load: Callable[[Path], T]) -> T | None:
    """What `load` makes of the first of a run's checkpoints (newest first)
    that is intact: a corrupt one is skipped with `warn`, one written for
    another model or optimizer (CheckpointMismatch) stops the search, so that
    a changed config never silently goes back to an older checkpoint. None
    when there are none; EiclError when every one is corrupt."""
    corrupt = 0
    for _, path in candidates:
        try:
            return load(path)
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            warn(f"skipping {path.name}: {e}")
            corrupt += 1
    if corrupt:
        raise EiclError(f"no intact checkpoint in {folder} ({corrupt} corrupt)")
    return None
