"""The synthetic glyph set: Omniglot-shaped, deterministic, and learnable."""

import numpy as np

from eicl_cli.data.dataset import downsample
from eicl_cli.data.synthetic import layout, synthetic_raw


def test_full_layout_matches_omniglot_counts():
    class_alphabet, alphabet_background, n_bg = layout(1623)
    assert len(class_alphabet) == 1623 and n_bg == 964
    assert alphabet_background.sum() == 30 and (~alphabet_background).sum() == 20
    assert (alphabet_background[class_alphabet][:964]).all()
    assert not alphabet_background[class_alphabet][964:].any()


def test_small_layout_has_both_sets():
    for n in (2, 5, 20, 100):
        class_alphabet, bg, n_bg = layout(n)
        assert len(class_alphabet) == n and 1 <= n_bg < n


def test_deterministic_and_marked_synthetic():
    a = synthetic_raw(6, 20, 105, seed=1)
    b = synthetic_raw(6, 20, 105, seed=1)
    c = synthetic_raw(6, 20, 105, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.kind == "synthetic" and a.source_sha256 != c.source_sha256
    assert a.images.shape == (120, 105, 105) and set(np.unique(a.images)) == {0, 1}
    # every drawing has ink, and a class's 20 drawings are not all identical
    assert (a.images.reshape(120, -1).min(axis=1) == 0).all()
    per_class = a.images.reshape(6, 20, -1)
    assert all(len({d.tobytes() for d in per_class[c]}) == 20 for c in range(6))


def test_learnable_nearest_centroid():
    """Drawers of one class resemble each other more than other classes: a
    nearest-centroid classifier on blurred 28 x 28 images, fitted on 10
    drawers and tested on the other 10, is far above chance (1/40)."""
    n = 40
    raw = synthetic_raw(n, 20, 105, seed=0)
    x = 1.0 - downsample(raw.images).reshape(n, 20, -1)  # ink = 1
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    centroids = x[:, :10].mean(axis=1)
    test = x[:, 10:].reshape(n * 10, -1)
    pred = np.argmax(test @ centroids.T, axis=1)
    acc = (pred == np.repeat(np.arange(n), 10)).mean()
    assert acc > 0.7, acc
