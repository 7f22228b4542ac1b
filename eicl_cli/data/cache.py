"""The one-file safetensors cache of a whole image set (Omniglot or synthetic).

Layout (format version 1):
  tensors  images          (N, ceil(H*W/8)) uint8   np.packbits of each flattened
                                                    image, 1 bit = white background
           image_class     (N,) int32               character id (Omniglot: IIII - 1)
           image_drawer    (N,) int8                drawer 1..20
           image_alphabet  (N,) int16               index into alphabet_names
           image_background (N,) uint8              1 = background set, 0 = evaluation
  metadata format_version, kind, synthetic, height, width, source, source_sha256,
           alphabet_names (JSON list), character_names (JSON list by class id),
           created (UTC ISO time), n_images, n_classes, n_alphabets,
           n_background_classes, n_evaluation_classes, content_sha256
Rows are sorted by (class id, drawer). The file is written to a temporary
name in the same folder and renamed, so a reader never sees half a file.

content_sha256 is the SHA-256 of everything else in the file: the header's
tensor table and metadata (as sorted JSON, this key left out) and the
tensor bytes. Every read checks it, so a cache damaged after it was built
(one flipped byte changes 8 pixels of one image) or cut short is refused
instead of trained on. A cache built before the key existed reads as
unchecked (`checked()` is false); `eicl prepare-data` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..errors import EiclError, first_line
from ..files import atomic_write_bytes

FORMAT_VERSION = "1"
CACHE_NAMES = {"omniglot": "omniglot.safetensors", "synthetic": "synthetic.safetensors"}
CONTENT_KEY = "content_sha256"
REBUILD = "rebuild it with `eicl prepare-data --force`"


@dataclass(frozen=True)
class RawSet:
    """A whole image set as decoded from its source, before split and exemplars."""

    images: np.ndarray  # (N, H, W) uint8 in {0, 1}, 1 = white background
    image_class: np.ndarray  # (N,) int32
    image_drawer: np.ndarray  # (N,) int8
    image_alphabet: np.ndarray  # (N,) int16
    image_background: np.ndarray  # (N,) bool
    alphabet_names: list[str]
    character_names: list[str]  # by class id
    kind: str = "omniglot"  # omniglot | synthetic
    source: str = ""  # what it was built from, for the user
    source_sha256: str = ""  # identity of the source; equal means "nothing to do"
    meta: dict[str, str] = field(default_factory=dict)  # as read back from a cache

    @property
    def num_classes(self) -> int:
        return len(self.character_names)


def cache_path(data_dir: Path, kind: str) -> Path:
    return Path(data_dir) / CACHE_NAMES[kind]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _header(data: bytes | memoryview) -> tuple[dict, int]:
    """A safetensors file's parsed header and the offset its tensor bytes start at."""
    size = int.from_bytes(bytes(data[:8]), "little")
    if not 0 < size < 1 << 28 or 8 + size > len(data):
        raise ValueError("bad header size")
    return json.loads(bytes(data[8:8 + size])), 8 + size


def content_digest(data: bytes | memoryview) -> str:
    """SHA-256 of a cache file's content, CONTENT_KEY itself left out."""
    header, start = _header(data)
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != CONTENT_KEY}
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps({"metadata": meta, "tensors": table}, sort_keys=True).encode())
    h.update(b"\0")
    h.update(memoryview(data)[start:])
    return h.hexdigest()


def verify(data: bytes | memoryview, path: Path) -> dict[str, str]:
    """A cache file's metadata once its content matches its CONTENT_KEY (or
    it predates the key); EiclError, one line, when damaged or cut short."""
    try:
        header, start = _header(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise EiclError(f"cache {path} is corrupt: its header cannot be read ({e}); "
                        f"{REBUILD}") from None
    meta = dict(header.get("__metadata__", {}))
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = start + max(ends, default=0)
    if len(data) != expected:
        raise EiclError(f"cache {path} is corrupt: {len(data):,} bytes where its header "
                        f"describes {expected:,} (cut short?); {REBUILD}")
    recorded = meta.get(CONTENT_KEY)
    if recorded is not None and content_digest(data) != recorded:
        raise EiclError(f"cache {path} is corrupt: its content does not match the "
                        f"checksum recorded when it was built; {REBUILD}")
    return meta


def checked(meta: dict[str, str]) -> bool:
    """Whether a cache carries a checksum (else an older eicl built it)."""
    return CONTENT_KEY in meta


def unchecked_note(path: Path, meta: dict[str, str]) -> str:
    """What to say of a cache without a checksum: what it risks, and the fix."""
    return (f"{path} holds no checksum (an older eicl built it), so damage to it would go "
            f"unnoticed; rebuild it from its source ({meta.get('source') or 'unknown'}) with "
            f"`eicl prepare-data --force`")


def check_cache(path: Path) -> dict[str, str]:
    """Read a whole cache file and verify it; returns its metadata."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EiclError(f"cannot read cache {path}: {e.strerror or e}") from None
    return verify(data, path)


def _check(raw: RawSet) -> None:
    n = len(raw.images)
    if raw.images.ndim != 3 or raw.images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W) uint8, got {raw.images.shape} {raw.images.dtype}")
    for name in ("image_class", "image_drawer", "image_alphabet", "image_background"):
        if len(getattr(raw, name)) != n:
            raise ValueError(f"{name} has {len(getattr(raw, name))} entries for {n} images")


def write_cache(raw: RawSet, path: Path) -> str:
    """Write `raw` to `path` atomically; returns the file's sha256."""
    _check(raw)
    order = np.lexsort((raw.image_drawer, raw.image_class))
    n, h, w = raw.images.shape
    packed = np.packbits(raw.images[order].reshape(n, h * w).astype(bool), axis=1)
    tensors = {
        "images": packed,
        "image_class": raw.image_class[order].astype(np.int32),
        "image_drawer": raw.image_drawer[order].astype(np.int8),
        "image_alphabet": raw.image_alphabet[order].astype(np.int16),
        "image_background": raw.image_background[order].astype(np.uint8),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": raw.kind,
        "synthetic": "true" if raw.kind != "omniglot" else "false",
        "height": str(h),
        "width": str(w),
        "source": raw.source,
        "source_sha256": raw.source_sha256,
        "alphabet_names": json.dumps(raw.alphabet_names),
        "character_names": json.dumps(raw.character_names),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Counts, so a summary needs only the header.
        "n_images": str(n),
        "n_classes": str(len(raw.character_names)),
        "n_alphabets": str(len(raw.alphabet_names)),
        "n_background_classes": str(np.unique(raw.image_class[raw.image_background]).size),
        "n_evaluation_classes": str(np.unique(raw.image_class[~raw.image_background]).size),
    }
    # The tensor bytes and table do not depend on the metadata: the digest
    # of a first serialisation is the digest of the final one.
    meta[CONTENT_KEY] = content_digest(st_save(tensors, metadata=meta))
    data = st_save(tensors, metadata=meta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def read_metadata(path: Path) -> dict[str, str]:
    """Only the header's metadata (cheap): used to decide whether to rebuild."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 28:
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
        return dict(header.get("__metadata__", {}))
    except (OSError, ValueError) as e:
        raise EiclError(f"cannot read cache {path}: {e}; rebuild it with `eicl prepare-data --force`") from None


def read_cache(path: Path) -> tuple[RawSet, str]:
    """Read a cache file; returns the set and the file's sha256."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EiclError(f"dataset cache not found: {path}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        meta = verify(data, path)
        t = st_load(data)
    except EiclError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise EiclError(f"cache {path} is corrupt ({first_line(e)}); {REBUILD}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise EiclError(f"cache {path} has format version {meta.get('format_version')!r}, "
                        f"this eicl reads {FORMAT_VERSION!r}; rebuild it with `eicl prepare-data --force`")
    h, w = int(meta["height"]), int(meta["width"])
    n = t["images"].shape[0]
    images = np.unpackbits(t["images"], axis=1, count=h * w).reshape(n, h, w)
    raw = RawSet(
        images=images,
        image_class=t["image_class"],
        image_drawer=t["image_drawer"],
        image_alphabet=t["image_alphabet"],
        image_background=t["image_background"].astype(bool),
        alphabet_names=json.loads(meta["alphabet_names"]),
        character_names=json.loads(meta["character_names"]),
        kind=meta["kind"],
        source=meta.get("source", ""),
        source_sha256=meta.get("source_sha256", ""),
        meta=meta,
    )
    return raw, digest
