"""Procedurally drawn, Omniglot-shaped glyphs for offline demos and tests.

Each character is a few cubic Bezier strokes; each of its drawers redraws it
with a small random affine change, control-point wobble and pen width, so
the drawings of one class differ but are recognisably one glyph. Alphabets
share a style (how many strokes, how curly, how thick). Rendering stamps a
pen disc at densely sampled points of every stroke, all in NumPy, chunk by
chunk. Everything is a pure function of the seed. Data made here is always
marked synthetic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cache import RawSet

OMNIGLOT_SIZE = 105
OMNIGLOT_BACKGROUND = (30, 964)  # alphabets, classes
OMNIGLOT_EVALUATION = (20, 659)
MAX_STROKES = 5
POINTS_PER_STROKE = 96
MAX_RADIUS = 3.0
_CHUNK = 512


def _split_counts(total: int, parts: int) -> np.ndarray:
    base, extra = divmod(total, parts)
    return np.array([base + (i < extra) for i in range(parts)], dtype=np.int64)


def layout(n_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Class -> alphabet, alphabet -> is-background, and the background class
    count, in Omniglot's proportions (the full 1,623 gives 30 + 20 alphabets
    and 964 + 659 classes)."""
    if n_classes < 1:
        raise ValueError("n_classes must be >= 1")
    n_bg = max(1, round(n_classes * OMNIGLOT_BACKGROUND[1] / 1623))
    if n_classes >= 2:
        n_bg = min(n_bg, n_classes - 1)
    n_ev = n_classes - n_bg
    a_bg = int(np.clip(round(OMNIGLOT_BACKGROUND[0] * n_bg / OMNIGLOT_BACKGROUND[1]), 1, n_bg))
    a_ev = int(np.clip(round(OMNIGLOT_EVALUATION[0] * n_ev / OMNIGLOT_EVALUATION[1]), 1, n_ev)) if n_ev else 0
    per_alphabet = np.concatenate([_split_counts(n_bg, a_bg), _split_counts(n_ev, a_ev) if n_ev else []])
    class_alphabet = np.repeat(np.arange(len(per_alphabet)), per_alphabet.astype(np.int64))
    alphabet_background = np.arange(len(per_alphabet)) < a_bg
    return class_alphabet.astype(np.int16), alphabet_background, n_bg


def _glyph_strokes(rng: np.random.Generator, class_alphabet: np.ndarray):
    """Control points (C, S, 4, 2) in [0, 1] and stroke counts (C,) per class."""
    n_alpha = int(class_alphabet.max()) + 1
    # Alphabet styles: stroke-count range, curliness, pen width.
    a_min = rng.integers(1, 4, n_alpha)
    a_max = np.minimum(a_min + rng.integers(1, 3, n_alpha), MAX_STROKES)
    a_curl = rng.uniform(0.2, 0.5, n_alpha)
    a_radius = rng.uniform(1.3, 2.4, n_alpha)
    c = len(class_alphabet)
    n_strokes = rng.integers(a_min[class_alphabet], a_max[class_alphabet] + 1)
    start = rng.uniform(0.15, 0.85, (c, MAX_STROKES, 2))
    # Half the strokes start where the previous one ended, as pen strokes of
    # real characters often do.
    steps = rng.normal(0, 1, (c, MAX_STROKES, 3, 2)) * a_curl[class_alphabet][:, None, None, None]
    pts = np.concatenate([start[:, :, None], start[:, :, None] + np.cumsum(steps, axis=2)], axis=2)
    pts = np.clip(pts, 0.05, 0.95)
    join = rng.random((c, MAX_STROKES)) < 0.5
    for s in range(1, MAX_STROKES):  # MAX_STROKES steps, vectorised over classes
        shift = np.where(join[:, s, None], pts[:, s - 1, 3] - pts[:, s, 0], 0.0)
        pts[:, s] = np.clip(pts[:, s] + shift[:, None], 0.05, 0.95)
    # Scale each glyph to fill the box like a real character does: its live
    # control points span 0.65 of the frame on the longer side, centred.
    live = (np.arange(MAX_STROKES)[None, :] < n_strokes[:, None])[:, :, None, None]
    lo = np.where(live, pts, np.inf).min(axis=(1, 2))
    hi = np.where(live, pts, -np.inf).max(axis=(1, 2))
    span = np.maximum((hi - lo).max(axis=1), 0.05)
    pts = (pts - (lo + hi)[:, None, None] / 2) * (0.65 / span)[:, None, None, None] + 0.5
    return pts, n_strokes, a_radius[class_alphabet]


def _bezier_basis(t: np.ndarray) -> np.ndarray:
    u = 1.0 - t
    return np.stack([u ** 3, 3 * u * u * t, 3 * u * t * t, t ** 3], axis=-1)


def _render(ctrl: np.ndarray, n_strokes: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Ink every pixel within `radius` of a stroke: (n, S, 4, 2) control points in
    pixel units -> (n, size, size) uint8, 1 = white."""
    n = len(ctrl)
    basis = _bezier_basis(np.linspace(0.0, 1.0, POINTS_PER_STROKE))
    live = np.arange(MAX_STROKES)[None, :] < n_strokes[:, None]  # (n, S)
    img, stroke = np.nonzero(live)
    pts = np.einsum("tk,mkd->mtd", basis, ctrl[img, stroke])  # (m, T, 2)
    centre = np.clip(np.rint(pts).astype(np.int32), 0, size - 1)
    owner = np.repeat(img.astype(np.int32), POINTS_PER_STROKE)
    # Neighbouring samples often land on one pixel: stamp each pixel once.
    key = np.unique(owner * (size * size) + centre[..., 0].ravel() * size + centre[..., 1].ravel())
    owner, rest = np.divmod(key, size * size)
    cy, cx = np.divmod(rest, size)
    r = int(np.ceil(MAX_RADIUS))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    disc = oy.ravel() ** 2 + ox.ravel() ** 2 <= MAX_RADIUS ** 2
    oy, ox, d2 = oy.ravel()[disc], ox.ravel()[disc], (oy.ravel() ** 2 + ox.ravel() ** 2)[disc]
    y = cy[:, None] + oy
    x = cx[:, None] + ox
    ok = (d2 <= (radius[owner] ** 2)[:, None]) & (y >= 0) & (y < size) & (x >= 0) & (x < size)
    canvas = np.ones(n * size * size, np.uint8)
    canvas[((owner[:, None] * size + y) * size + x)[ok]] = 0
    return canvas.reshape(n, size, size)


def synthetic_raw(n_classes: int = 1623, n_drawers: int = 20, size: int = OMNIGLOT_SIZE,
                  seed: int = 0, progress: Callable[[int], None] | None = None) -> RawSet:
    """The whole synthetic set, Omniglot-shaped: rows sorted by (class, drawer).
    `progress(k)` is called with the number of images finished after each chunk."""
    if n_classes < 1 or n_drawers < 1 or size < 8:
        raise ValueError("synthetic set needs n_classes >= 1, n_drawers >= 1, size >= 8")
    rng = np.random.default_rng(seed)
    class_alphabet, alphabet_background, _ = layout(n_classes)
    ctrl, n_strokes, base_radius = _glyph_strokes(rng, class_alphabet)

    n = n_classes * n_drawers
    img_class = np.repeat(np.arange(n_classes), n_drawers)
    # Per-drawing jitter: rotation, anisotropic scale, shear, shift, wobble, pen.
    theta = rng.normal(0, 0.10, n)
    scale = 1.0 + rng.normal(0, 0.07, (n, 2))
    shear = rng.normal(0, 0.08, n)
    shift = rng.normal(0, 0.035, (n, 2))
    wobble = rng.normal(0, 0.018, (n, MAX_STROKES, 4, 2))
    pen = np.clip(base_radius[img_class] * rng.uniform(0.85, 1.15, n), 0.8, MAX_RADIUS)
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    affine = rot @ shr * scale[:, :, None]
    pix = size / OMNIGLOT_SIZE
    radius = np.maximum(pen * pix, 0.75)

    images = np.empty((n, size, size), np.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        c = img_class[lo:hi]
        p = ctrl[c] + wobble[lo:hi] - 0.5  # centre, so the affine turns about the middle
        p = np.einsum("nij,nskj->nski", affine[lo:hi], p) + 0.5 + shift[lo:hi, None, None]
        p = p * (size - 1)
        images[lo:hi] = _render(p, n_strokes[c], radius[lo:hi], size)
        if progress is not None:
            progress(hi)

    n_alpha = len(alphabet_background)
    alphabet_names = [f"Synthetic_{'bg' if alphabet_background[a] else 'ev'}_{a + 1:02d}"
                      for a in range(n_alpha)]
    first = np.searchsorted(class_alphabet, np.arange(n_alpha))
    character_names = [f"{alphabet_names[a]}/character{c - first[a] + 1:02d}"
                       for c, a in enumerate(class_alphabet)]
    return RawSet(
        images=images,
        image_class=img_class.astype(np.int32),
        image_drawer=np.tile(np.arange(1, n_drawers + 1), n_classes).astype(np.int8),
        image_alphabet=class_alphabet[img_class].astype(np.int16),
        image_background=alphabet_background[class_alphabet[img_class]],
        alphabet_names=alphabet_names,
        character_names=character_names,
        kind="synthetic",
        source=f"synthetic(classes={n_classes}, drawers={n_drawers}, size={size}, seed={seed})",
        source_sha256=f"synthetic:v1:{n_classes}:{n_drawers}:{size}:{seed}",
    )


def synthetic_dataset(n_classes: int = 20, n_drawers: int = 20, size: int = OMNIGLOT_SIZE,
                      seed: int = 0):
    """A small in-memory synthetic Dataset (split all, exemplars all), no cache file."""
    from .dataset import from_raw  # dataset imports cache; keep this module import-light

    return from_raw(synthetic_raw(n_classes, n_drawers, size, seed))


__all__ = ["synthetic_raw", "synthetic_dataset", "layout"]
