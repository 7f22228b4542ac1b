"""Augmentation variants: flip left-right, then rotate k x 90 degrees counter-clockwise."""

import numpy as np
import pytest

from eicl_cli.data.augment import apply_variant, variant_permutations


def test_variant_order_matches_flip_then_rot90():
    img = np.array([[1, 2], [3, 4]])
    # v = 4 * flip + k; tf.image.rot90 and np.rot90 both turn counter-clockwise.
    assert apply_variant(img, 0).tolist() == [[1, 2], [3, 4]]
    assert apply_variant(img, 1).tolist() == [[2, 4], [1, 3]]
    assert apply_variant(img, 4).tolist() == [[2, 1], [4, 3]]
    # flipped first, then turned: [[2,1],[4,3]] -> [[1,3],[2,4]]
    assert apply_variant(img, 5).tolist() == [[1, 3], [2, 4]]


@pytest.mark.parametrize("h", [5, 28, 105])
def test_permutation_table_equals_numpy_composition(h):
    rng = np.random.default_rng(h)
    img = rng.integers(0, 256, (h, h))
    perm = variant_permutations(h, h)
    assert perm.shape == (8, h * h) and perm.dtype == np.int32
    for v in range(8):
        flip, k = divmod(v, 4)
        want = np.rot90(np.fliplr(img) if flip else img, k)
        np.testing.assert_array_equal(img.reshape(-1)[perm[v]].reshape(h, h), want)
    # all eight are distinct permutations of the pixels
    assert len({p.tobytes() for p in perm}) == 8
    assert all(np.array_equal(np.sort(p), np.arange(h * h)) for p in perm)


def test_bad_variant_refused():
    with pytest.raises(ValueError):
        apply_variant(np.zeros((2, 2)), 8)
