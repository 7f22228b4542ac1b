"""On-device batch materialisation (inputs.py) against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eicl_cli import config
from eicl_cli.data.augment import apply_variant
from eicl_cli.data.dataset import downsample
from eicl_cli.data.synthetic import synthetic_dataset
from eicl_cli.inputs import SOURCE_SIZE, device_data, materialise


def _cfg(preproc: dict | None = None, **seq) -> config.Config:
    return config.from_dict({"data": {"dataset": "synthetic", "n_to_keep": 10},
                             "classes": {"n_rare": 4, "n_common": 3, "n_holdout": 3},
                             "sequences": seq, "preproc": preproc or {}})


@pytest.fixture(scope="module")
def ds():
    return synthetic_dataset(n_classes=10, n_drawers=4, size=SOURCE_SIZE, seed=1)


def _batch(ds, b=3, l=5, variant=None, slot=None, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image_index": jnp.asarray(rng.integers(0, len(ds.images), (b, l)), jnp.int32),
        "variant": jnp.asarray(variant if variant is not None else rng.integers(0, 8, (b, l)),
                               jnp.int32),
        "label": jnp.zeros((b, l), jnp.int32),
        "rare_slot": jnp.asarray(slot if slot is not None else -np.ones((b, l)), jnp.int32),
    }


def test_gather_and_augmentation_match_numpy(ds):
    cfg = _cfg()
    cfg = cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, "augment_images": True}))
    data = device_data(ds, cfg)
    batch = _batch(ds)
    x = np.asarray(materialise(data, batch, jax.random.key(0)))
    idx, var = np.asarray(batch["image_index"]), np.asarray(batch["variant"])
    assert x.dtype == np.float32 and x.shape == (3, 5, SOURCE_SIZE, SOURCE_SIZE)
    for b in range(3):
        for i in range(5):
            expect = apply_variant(ds.images[idx[b, i]], int(var[b, i])).astype(np.float32)
            assert np.array_equal(x[b, i], expect)
    assert len(set(var.ravel().tolist())) > 1  # several variants were exercised


def test_no_augmentation_ignores_variant(ds):
    data = device_data(ds, _cfg())
    batch = _batch(ds)
    x = np.asarray(materialise(data, batch, jax.random.key(0)))
    assert np.array_equal(x, ds.images[np.asarray(batch["image_index"])].astype(np.float32))


def test_invert_feeds_one_minus_pixel_after_noise(ds):
    """Inversion is the last step, so noise is inverted too."""
    def cfg(invert, noise):
        return _cfg({"invert": invert}, noise_scale=noise)
    batch = _batch(ds)
    a = np.asarray(materialise(device_data(ds, cfg(False, 0.3)), batch, jax.random.key(4)))
    b = np.asarray(materialise(device_data(ds, cfg(True, 0.3)), batch, jax.random.key(4)))
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)
    clean = np.asarray(materialise(device_data(ds, cfg(True, 0.0)), batch, jax.random.key(4)))
    expect = 1.0 - ds.images[np.asarray(batch["image_index"])].astype(np.float32)
    assert np.array_equal(clean, expect) and clean.min() == 0.0 and clean.max() == 1.0


def test_random_rare_images_are_shared_within_a_sequence(ds):
    data = device_data(ds, _cfg(randomly_generate_rare=True))
    # Sequence 0: a rare class at positions 0, 2, 4 (first at 0); another at 3.
    slot = np.array([[0, -1, 0, 3, 0], [-1, -1, -1, -1, -1], [1, 1, -1, -1, -1]])
    batch = _batch(ds, slot=slot)
    x = np.asarray(materialise(data, batch, jax.random.key(3)))
    assert np.array_equal(x[0, 0], x[0, 2]) and np.array_equal(x[0, 0], x[0, 4])
    assert not np.array_equal(x[0, 0], x[0, 3])
    assert set(np.unique(x[0, 0]).tolist()) == {0.0, 1.0}
    assert 0.4 < x[0, 0].mean() < 0.6  # fair coin per pixel
    assert np.array_equal(x[2, 0], x[2, 1]) and not np.array_equal(x[2, 0], x[0, 0])
    idx = np.asarray(batch["image_index"])
    assert np.array_equal(x[1], ds.images[idx[1]].astype(np.float32))  # untouched
    assert np.array_equal(x[0, 1], ds.images[idx[0, 1]].astype(np.float32))


def test_noise_has_the_configured_scale_and_depends_on_the_key(ds):
    data = device_data(ds, _cfg(noise_scale=0.5))
    batch = _batch(ds)
    clean = ds.images[np.asarray(batch["image_index"])].astype(np.float32)
    a = np.asarray(materialise(data, batch, jax.random.key(1)))
    b = np.asarray(materialise(data, batch, jax.random.key(1)))
    c = np.asarray(materialise(data, batch, jax.random.key(2)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs((a - clean).std() - 0.5) < 0.01 and abs((a - clean).mean()) < 0.01


def test_downsampled_noise_is_drawn_at_105_and_resized(ds):
    """resize(image + noise) == resize(image) + resize(noise): the noise of a
    downsampled run has the variance of resized 105 x 105 noise, not 0.5**2."""
    small = ds.__class__(**{**ds.__dict__, "images": downsample(ds.images, 28)})
    cfg = _cfg(noise_scale=0.5)
    cfg = cfg.replace(preproc=cfg.preproc.__class__(downsample=True))
    data = device_data(small, cfg)
    batch = _batch(small, b=8, l=9)
    clean = small.images[np.asarray(batch["image_index"])]
    x = np.asarray(materialise(data, batch, jax.random.key(5)))
    assert x.shape == (8, 9, 28, 28)
    # Bilinear 105 -> 28 averages 2 x 2 source pixels per output pixel (scale 3.75,
    # no antialiasing), so the std is 0.5 * sqrt(sum of squared weights) < 0.5.
    from eicl_cli.data.dataset import resize_matrix
    r = resize_matrix(105, 28)
    expect = 0.5 * np.sqrt(np.mean(np.outer((r ** 2).sum(1), (r ** 2).sum(1))))
    assert abs((x - clean).std() - expect) < 0.02 and expect < 0.45


def test_symbolic_examples_are_integers():
    from eicl_cli.data.dataset import symbolic_dataset
    ds = symbolic_dataset(12)
    cfg = config.from_dict({"data": {"dataset": "symbolic", "symbolic_classes": 12},
                            "classes": {"n_rare": 6, "n_common": 3, "n_holdout": 3},
                            "embedding": {"example_encoder": "embedding"}})
    data = device_data(ds, cfg)
    batch = {"image_index": jnp.asarray([[3, 4, 5]], jnp.int32)}
    x = materialise(data, batch, jax.random.key(0))
    assert x.dtype == jnp.int32 and np.array_equal(np.asarray(x), [[3, 4, 5]])
