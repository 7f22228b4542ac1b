"""Dataset building (docs/experiment.md §2): split, exemplars, n_to_keep, augmentation,
downsampling, symbolic data, and load_dataset's cache handling."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eicl_cli import config
from eicl_cli.data.cache import cache_path, read_cache, write_cache
from eicl_cli.data.dataset import (Dataset, downsample, from_raw, load_dataset,
                                   resize_matrix, symbolic_dataset)
from eicl_cli.data.synthetic import synthetic_dataset, synthetic_raw
from eicl_cli.errors import EiclError


@pytest.fixture(scope="module")
def raw():
    return synthetic_raw(n_classes=12, n_drawers=20, size=105, seed=3)


def test_synthetic_dataset_shape_and_pixels():
    ds = synthetic_dataset(n_classes=20)
    assert isinstance(ds, Dataset) and ds.kind == "synthetic" and ds.synthetic
    assert ds.images.shape == (400, 105, 105) and ds.images.dtype == np.uint8
    assert set(np.unique(ds.images)) == {0, 1}
    assert ds.images.mean() > 0.8  # mostly white background, 1 = white
    assert ds.class_images.shape == (20, 20) and ds.num_classes == 20
    assert (ds.class_variant == 0).all() and ds.class_source.tolist() == list(range(20))
    # exemplar e of class c is drawer e + 1 of that class
    assert (ds.image_drawer[ds.class_images] == np.arange(1, 21)).all()


def test_symbolic_dataset():
    ds = symbolic_dataset(7)
    assert ds.kind == "symbolic" and ds.images.dtype == np.int32
    assert ds.images.tolist() == list(range(7)) and ds.class_images.tolist() == [[i] for i in range(7)]
    assert ds.num_classes == 7


def test_splits(raw):
    n_bg = int(np.unique(raw.image_class[raw.image_background]).size)
    train = from_raw(raw, split="train")
    test = from_raw(raw, split="test")
    both = from_raw(raw, split="all")
    assert train.num_classes == n_bg and test.num_classes == 12 - n_bg and both.num_classes == 12
    assert train.class_source.tolist() == list(range(n_bg))
    assert test.class_source.tolist() == list(range(n_bg, 12))
    # the pixels of class c's exemplar e are raw class c, drawer e + 1
    row = np.flatnonzero((raw.image_class == n_bg + 1) & (raw.image_drawer == 5))[0]
    np.testing.assert_array_equal(test.images[test.class_images[1, 4]], raw.images[row])


def test_exemplar_modes(raw):
    single = from_raw(raw, exemplars="single")
    assert single.class_images.shape == (12, 1)
    assert (single.image_drawer[single.class_images[:, 0]] == 1).all()
    assert len(single.images) == 12  # unused drawings are dropped
    sep = from_raw(raw, exemplars="separated")
    assert sep.class_images.shape == (240, 1)
    # class id = class * 20 + (drawer - 1)
    cls = np.arange(240)
    assert (sep.class_source == cls // 20).all()
    assert (sep.image_drawer[sep.class_images[:, 0]] == cls % 20 + 1).all()


def test_augmentation_and_n_to_keep_order(raw):
    aug = from_raw(raw, augment_images=True)
    assert aug.num_classes == 96
    assert aug.class_variant.tolist() == list(range(8)) * 12
    assert (aug.class_source == np.arange(96) // 8).all()
    assert (aug.class_images[8 * 3 + 5] == aug.class_images[8 * 3]).all()  # shared images
    # As in the original, n_to_keep counts classes before the x8 augmentation.
    kept = from_raw(raw, augment_images=True, n_to_keep=5)
    assert kept.num_classes == 40 and kept.class_source.max() == 4
    plain = from_raw(raw, n_to_keep=5, exemplars="separated")
    assert plain.num_classes == 5 and (plain.class_source == 0).all()


def test_downsample_matches_half_pixel_bilinear(raw):
    imgs = raw.images[:6]
    ours = downsample(imgs)
    assert ours.shape == (6, 28, 28) and ours.dtype == np.float32
    # jax.image.resize with linear, no antialias, is tf.image.resize's default
    # (half-pixel centres); an independent implementation to compare with.
    ref = jax.image.resize(jnp.asarray(imgs, jnp.float32), (6, 28, 28), "linear", antialias=False)
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)
    rm = resize_matrix(105, 28)
    np.testing.assert_allclose(rm @ imgs[0] @ rm.T, ours[0], atol=1e-5)
    assert np.allclose(rm.sum(axis=1), 1.0)


def test_downsample_commutes_with_augmentation(raw):
    from eicl_cli.data.augment import apply_variant
    img = raw.images[7]
    for v in range(8):
        a = downsample(apply_variant(img, v)[None])[0]
        b = apply_variant(downsample(img[None])[0], v)
        # Reordered: the same float32 resampling computed in another order;
        # pixels are in [0, 1].
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_load_dataset_from_cache(raw, tmp_path):
    path = cache_path(tmp_path, "synthetic")
    sha = write_cache(raw, path)
    cfg = config.from_dict({"data": {"dataset": "synthetic", "split": "all"},
                            "classes": {"n_rare": 8, "n_common": 2, "n_holdout": 2},
                            "preproc": {"downsample": True}})
    ds = load_dataset(cfg, tmp_path)
    assert ds.cache_file == str(path.resolve()) and ds.cache_sha256 == sha
    assert ds.images.shape == (240, 28, 28) and ds.images.dtype == np.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    back, digest = read_cache(path)
    assert digest == sha
    np.testing.assert_array_equal(back.images, raw.images)
    assert back.alphabet_names == raw.alphabet_names and back.meta["synthetic"] == "true"


def test_load_dataset_missing_cache_names_the_command(tmp_path):
    cfg = config.Config()
    with pytest.raises(EiclError, match=r"eicl prepare-data --data-dir"):
        load_dataset(cfg, tmp_path)
    cfg = config.from_dict({"data": {"dataset": "synthetic"}})
    with pytest.raises(EiclError, match=r"eicl prepare-data --source synthetic"):
        load_dataset(cfg, tmp_path)


def test_load_dataset_symbolic_needs_no_cache(tmp_path):
    cfg = config.from_dict({"data": {"dataset": "symbolic", "symbolic_classes": 50},
                            "embedding": {"example_encoder": "embedding"},
                            "classes": {"n_rare": 30, "n_common": 10, "n_holdout": 10}})
    ds = load_dataset(cfg, tmp_path)
    assert ds.kind == "symbolic" and ds.num_classes == 50


def test_corrupt_cache_is_refused(raw, tmp_path):
    path = cache_path(tmp_path, "synthetic")
    write_cache(raw, path)
    path.write_bytes(path.read_bytes()[:1000])
    cfg = config.from_dict({"data": {"dataset": "synthetic"},
                            "classes": {"n_rare": 8, "n_common": 2, "n_holdout": 2}})
    with pytest.raises(EiclError, match="corrupt"):
        load_dataset(cfg, tmp_path)


def test_load_dataset_refuses_more_classes_than_the_cache_has(raw, tmp_path):
    write_cache(raw, cache_path(tmp_path, "synthetic"))
    cfg = config.from_dict({"data": {"dataset": "synthetic"},
                            "classes": {"n_rare": 20, "n_common": 2, "n_holdout": 2}})
    with pytest.raises(EiclError, match=r"= 24 exceeds the 12 classes"):
        load_dataset(cfg, tmp_path)


# ---------------------------------------------------------------- cache integrity

def _synthetic_cfg():
    return config.from_dict({"data": {"dataset": "synthetic"},
                             "classes": {"n_rare": 8, "n_common": 2, "n_holdout": 2}})


def _payload_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _flip(offset):
    def damage(data: bytes) -> bytes:
        at = offset(data)
        return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]
    return damage


def _edit_header(old: bytes, new: bytes):
    def damage(data: bytes) -> bytes:
        start = _payload_start(data)
        assert data[:start].count(old) == 1 and len(old) == len(new)
        return data[:start].replace(old, new) + data[start:]
    return damage


# One fault each; every one read back silently before the checksum.
DAMAGE = {
    "a flipped bit in one image": _flip(lambda d: _payload_start(d) + 1000),
    "a flipped bit in the last byte": _flip(lambda d: len(d) - 1),
    "a flipped bit in the class ids": _flip(lambda d: len(d) - 240 * 8 + 3),
    "an edited alphabet name": _edit_header(b"Synthetic_ev_02\\\"", b"Synthetic_ev_07\\\""),
    "an edited image count": _edit_header(b'"n_images":"240"', b'"n_images":"241"'),
    "cut short by one byte": lambda d: d[:-1],
    "cut to half": lambda d: d[:len(d) // 2],
    "cut inside the header": lambda d: d[:1000],
    "bytes appended": lambda d: d + b"\0" * 8,
}


@pytest.mark.parametrize("fault", sorted(DAMAGE))
def test_a_damaged_cache_is_refused_in_one_line(raw, tmp_path, fault):
    path = cache_path(tmp_path, "synthetic")
    write_cache(raw, path)
    load_dataset(_synthetic_cfg(), tmp_path)  # intact: read without a word
    path.write_bytes(DAMAGE[fault](path.read_bytes()))
    with pytest.raises(EiclError) as err:
        load_dataset(_synthetic_cfg(), tmp_path)
    message = str(err.value)
    assert message.startswith(f"cache {path} is corrupt: ") and "\n" not in message
    assert message.endswith("rebuild it with `eicl prepare-data --force`")


def without_checksum(path):
    """Rewrite a cache as an eicl without checksums wrote it."""
    from safetensors.numpy import load, save
    from eicl_cli.data.cache import CONTENT_KEY, read_metadata
    meta = read_metadata(path)
    del meta[CONTENT_KEY]
    path.write_bytes(save(load(path.read_bytes()), metadata=meta))


def test_a_cache_without_a_checksum_is_read_with_a_warning(raw, tmp_path, capsys):
    path = cache_path(tmp_path, "synthetic")
    write_cache(raw, path)
    checked_images = load_dataset(_synthetic_cfg(), tmp_path).images
    assert capsys.readouterr().err == ""
    without_checksum(path)
    ds = load_dataset(_synthetic_cfg(), tmp_path)
    np.testing.assert_array_equal(ds.images, checked_images)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path} holds no checksum (an older eicl built it)")
    assert "`eicl prepare-data --force`" in err
    # Its size is still checked against its header.
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(EiclError, match="is corrupt: .* bytes where its header describes"):
        load_dataset(_synthetic_cfg(), tmp_path)
