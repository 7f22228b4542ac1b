"""The eight augmentation variants of docs/experiment.md §2 as pixel permutations.

Variant v = 4 * flip + k: flip left-right (if flip), THEN rotate by k x 90
degrees counter-clockwise, the order the original applies
tf.image.flip_left_right and tf.image.rot90 in. Expressing each variant as a
gather table lets the device apply it to a batch with one take, so augmented
classes never need their own copies of the images.
"""

from __future__ import annotations

import numpy as np

N_VARIANTS = 8


def apply_variant(img: np.ndarray, v: int) -> np.ndarray:
    """Variant v of one (H, W) image, in NumPy (reference for tests and display)."""
    if not 0 <= v < N_VARIANTS:
        raise ValueError(f"variant {v} outside 0..7")
    flip, k = divmod(int(v), 4)
    out = np.fliplr(img) if flip else img
    # np.rot90 turns from the first axis towards the second: counter-clockwise,
    # as tf.image.rot90 does.
    return np.ascontiguousarray(np.rot90(out, k))


def variant_permutations(h: int, w: int) -> np.ndarray:
    """(8, h*w) int32 table: img.reshape(-1)[perm[v]] is apply_variant(img, v).

    Rotations by 90 or 270 degrees swap the axes, so for h != w those rows
    describe an image of shape (w, h); Omniglot images are square."""
    index = np.arange(h * w, dtype=np.int32).reshape(h, w)
    return np.stack([apply_variant(index, v).reshape(-1) for v in range(N_VARIANTS)])
