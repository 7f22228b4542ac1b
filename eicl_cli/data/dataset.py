"""`Dataset`, the in-memory image set every other part reads, and
`load_dataset(cfg)`, which builds it from the cache as docs/experiment.md §2 says.

Order of the transforms, as in the original OmniglotDatasetForSampling:
split -> exemplars -> n_to_keep -> augmentation. n_to_keep therefore counts
classes BEFORE the x8 augmentation (n_to_keep=100 with augmentation gives 800
classes). Downsampling comes last; the original resizes each batch after
augmentation, and bilinear resizing with half-pixel centres commutes exactly
with flips and 90-degree turns of a square image, so resizing the stored
images once gives the same pixels. (It does not commute with pixel noise: the
original adds noise at 105 x 105 and then resizes; see `resize_matrix`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config as config_mod
from ..errors import EiclError
from .augment import N_VARIANTS
from .cache import RawSet, cache_path, checked, read_cache, unchecked_note

DOWNSAMPLED_SIZE = 28


@dataclass(frozen=True)
class Dataset:
    kind: str  # "omniglot" | "synthetic" | "symbolic"
    images: np.ndarray  # (N, H, W) uint8 {0, 1}, 1 = white; float32 [0, 1] if downsampled;
    # (N,) int32 for symbolic
    class_images: np.ndarray  # (C, E) int32: row of `images` for exemplar e of class c
    class_variant: np.ndarray  # (C,) int8: augmentation variant 0..7 (0 = none)
    class_source: np.ndarray  # (C,) int32: character id class c comes from
    image_drawer: np.ndarray  # (N,) int8, 1..20
    image_alphabet: np.ndarray  # (N,) int16, index into alphabet_names
    alphabet_names: list[str]
    synthetic: bool  # True unless these are real Omniglot drawings
    cache_file: str  # "" when built in memory
    cache_sha256: str

    @property
    def num_classes(self) -> int:
        return int(self.class_images.shape[0])

    @property
    def exemplars_per_class(self) -> int:
        return int(self.class_images.shape[1])


# ---------------------------------------------------------------- resizing

def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tf.image.resize's default along one axis (bilinear, half-pixel centres,
    no antialiasing): output i = (1 - w_i) * in[low_i] + w_i * in[high_i]."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    low_f = np.floor(pos)
    low = np.clip(low_f.astype(np.int64), 0, n_in - 1)
    high = np.clip(np.ceil(pos).astype(np.int64), 0, n_in - 1)
    return low, high, (pos - low_f).astype(np.float32)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 resize weights along one axis: a (H, W) image
    resizes as R_h @ img @ R_w.T (for resizing on the device, e.g. after noise)."""
    low, high, w = _resize_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, low), 1.0 - w)
    np.add.at(m, (rows, high), w)
    return m


def downsample(images: np.ndarray, size: int = DOWNSAMPLED_SIZE) -> np.ndarray:
    """(N, H, W) images in {0, 1} or [0, 1] -> (N, size, size) float32."""
    _, h, w = images.shape
    rlo, rhi, rw = _resize_taps(h, size)
    clo, chi, cw = _resize_taps(w, size)
    out = np.empty((len(images), size, size), np.float32)
    # Two taps per output pixel: gathering them beats a dense matmul by ~2x,
    # and chunks keep the float copies small.
    for lo in range(0, len(images), 2048):
        c = images[lo:lo + 2048]
        rows = c[:, rlo].astype(np.float32) * (1 - rw)[:, None] + c[:, rhi].astype(np.float32) * rw[:, None]
        out[lo:lo + len(c)] = rows[:, :, clo] * (1 - cw) + rows[:, :, chi] * cw
    return out


# ---------------------------------------------------------------- building

def from_raw(raw: RawSet, *, split: str = "all", exemplars: str = "all",
             augment_images: bool = False, n_to_keep: int = 0, downsample_to: int = 0,
             cache_file: str = "", cache_sha256: str = "") -> Dataset:
    """Apply split, exemplars, n_to_keep, augmentation and downsampling (docs/experiment.md §2)."""
    if split == "train":
        keep = raw.image_background
    elif split == "test":
        keep = ~raw.image_background
    elif split == "all":
        keep = np.ones(len(raw.images), bool)
    else:
        raise EiclError(f"data.split = {split!r} is not allowed; choose one of: train, test, all")
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise EiclError(f"the {raw.kind} data has no images in split {split!r}")
    # Sorted by (class, drawer) so exemplar 0 is the lowest drawer (drawer 01).
    rows = rows[np.lexsort((raw.image_drawer[rows], raw.image_class[rows]))]
    cls = raw.image_class[rows]
    classes, first, counts = np.unique(cls, return_index=True, return_counts=True)
    if np.any(counts != counts[0]):
        bad = int(classes[np.argmax(counts != counts[0])])
        raise EiclError(f"class {bad} has a different number of drawings than class "
                        f"{int(classes[0])} ({counts[counts != counts[0]][0]} vs {counts[0]})")
    n_ex = int(counts[0])
    class_images = np.arange(rows.size, dtype=np.int32).reshape(len(classes), n_ex)
    class_source = classes.astype(np.int32)

    if exemplars == "single":
        class_images = class_images[:, :1]
    elif exemplars == "separated":
        # Each drawing becomes its own class: id class * E + (drawer index).
        class_source = np.repeat(class_source, n_ex)
        class_images = class_images.reshape(-1, 1)
    elif exemplars != "all":
        raise EiclError(f"data.exemplars = {exemplars!r} is not allowed; choose one of: all, single, separated")

    if n_to_keep:
        class_images = class_images[:n_to_keep]
        class_source = class_source[:n_to_keep]

    if augment_images:
        # Class 8 * c + v is variant v of class c; the images are shared.
        class_images = np.repeat(class_images, N_VARIANTS, axis=0)
        class_source = np.repeat(class_source, N_VARIANTS)
        class_variant = np.tile(np.arange(N_VARIANTS, dtype=np.int8), len(class_source) // N_VARIANTS)
    else:
        class_variant = np.zeros(len(class_source), np.int8)

    # Keep only the images some class uses, so downsampling and memory scale
    # with what the run needs.
    used, inverse = np.unique(class_images, return_inverse=True)
    class_images = inverse.reshape(class_images.shape).astype(np.int32)
    src = rows[used]
    # The cache is stored sorted, so "everything" needs no 350 MB copy.
    whole = len(src) == len(raw.images) and np.array_equal(src, np.arange(len(src)))
    images = raw.images if whole else raw.images[src]
    if downsample_to:
        images = downsample(images, downsample_to)
    return Dataset(
        kind=raw.kind,
        images=images,
        class_images=class_images,
        class_variant=class_variant,
        class_source=class_source,
        image_drawer=raw.image_drawer[src].astype(np.int8),
        image_alphabet=raw.image_alphabet[src].astype(np.int16),
        alphabet_names=list(raw.alphabet_names),
        synthetic=raw.kind != "omniglot",
        cache_file=cache_file,
        cache_sha256=cache_sha256,
    )


def symbolic_dataset(n_classes: int) -> Dataset:
    """Integers 0..n-1 as examples, one exemplar per class (SymbolicDatasetForSampling)."""
    if n_classes < 1:
        raise EiclError(f"data.symbolic_classes = {n_classes} must be >= 1")
    ids = np.arange(n_classes, dtype=np.int32)
    return Dataset(
        kind="symbolic",
        images=ids,
        class_images=ids[:, None].copy(),
        class_variant=np.zeros(n_classes, np.int8),
        class_source=ids.copy(),
        image_drawer=np.ones(n_classes, np.int8),
        image_alphabet=np.zeros(n_classes, np.int16),
        alphabet_names=["symbolic"],
        synthetic=True,
        cache_file="",
        cache_sha256="",
    )


def prepare_command(kind: str, data_dir: Path) -> str:
    """The command that builds the missing cache, for error messages."""
    source = " --source synthetic" if kind == "synthetic" else ""
    return f"eicl prepare-data{source} --data-dir {data_dir}"


def load_dataset(cfg: config_mod.Config, data_dir: Path | None = None) -> Dataset:
    """The dataset a run uses, as cfg.data and cfg.preproc describe it."""
    d = cfg.data
    size = DOWNSAMPLED_SIZE if cfg.preproc.downsample else 0
    if d.dataset == "symbolic":
        ds = symbolic_dataset(d.symbolic_classes)
        if d.n_to_keep:
            ds = symbolic_dataset(min(d.n_to_keep, d.symbolic_classes))
        return ds
    if d.dataset not in ("omniglot", "synthetic"):
        raise EiclError(f"data.dataset = {d.dataset!r} is not allowed; choose one of: omniglot, synthetic, symbolic")
    root = Path(data_dir) if data_dir is not None else config_mod.data_dir(cfg)
    path = cache_path(root, d.dataset)
    if not path.is_file() and data_dir is None and d.cache_file and Path(d.cache_file).is_file():
        # A run's config records the cache it was made with (train.with_cache_identity):
        # `eicl eval` or `--resume` from a shell without that run's EICL_DATA_DIR finds it.
        path = Path(d.cache_file)
    if not path.is_file():
        raise EiclError(f"no {d.dataset} cache at {path}; make it with "
                        f"`{prepare_command(d.dataset, root)}`, or point eicl at the folder "
                        f"that holds it with EICL_DATA_DIR or data.data_dir")
    raw, digest = read_cache(path)
    if not checked(raw.meta):
        from .. import display
        display.warn(unchecked_note(path, raw.meta))
    if raw.kind != d.dataset:
        raise EiclError(f"cache {path} holds {raw.kind!r} data, not {d.dataset!r}; "
                        f"rebuild it with `{prepare_command(d.dataset, root)} --force`")
    ds = from_raw(raw, split=d.split, exemplars=d.exemplars, augment_images=d.augment_images,
                  n_to_keep=d.n_to_keep, downsample_to=size,
                  cache_file=str(path.resolve()), cache_sha256=digest)
    _check_fits(cfg, ds, path)
    return ds


def _check_fits(cfg: config_mod.Config, ds: Dataset, path: Path) -> None:
    """The class counts config validation assumed (full Omniglot) against the
    cache actually read, which may be a smaller synthetic or test set."""
    c = cfg.classes
    needed = c.n_rare + c.n_common + c.n_holdout
    if needed > ds.num_classes:
        raise EiclError(
            f"classes.n_rare + n_common + n_holdout = {needed} exceeds the {ds.num_classes} classes "
            f"of {path} (split {cfg.data.split!r}, exemplars {cfg.data.exemplars!r}, "
            f"augment_images={cfg.data.augment_images}, n_to_keep={cfg.data.n_to_keep})")
    g = c.preserve_ordering_every_n
    if g > 1 and ds.num_classes % g:
        raise EiclError(f"classes.preserve_ordering_every_n = {g} must divide the "
                        f"{ds.num_classes} classes of {path}")
