"""The real Omniglot zips in ../shared/data/omniglot (skipped when absent)."""

import numpy as np
import pytest

from eicl_cli import config
from eicl_cli.data.dataset import load_dataset
from eicl_cli.prepare import prepare_data
from omniglot_fixture import NEEDS_REAL, REAL

pytestmark = NEEDS_REAL


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    r = prepare_data(str(REAL), d)
    assert (r.n_images, r.n_classes, r.n_alphabets) == (32_460, 1_623, 50)
    assert (r.n_background_classes, r.n_evaluation_classes) == (964, 659)
    return d


def _cfg(**data) -> config.Config:
    return config.from_dict({"data": {"dataset": "omniglot", **data},
                             "classes": {"n_rare": 10, "n_common": 10, "n_holdout": 10}})


def test_counts_ids_and_pixels(cache_dir):
    ds = load_dataset(_cfg(), cache_dir)
    assert ds.images.shape == (32_460, 105, 105) and ds.num_classes == 1_623
    assert len(ds.alphabet_names) == 50 and not ds.synthetic
    # images_background/Alphabet_of_the_Magi/character01/0709_01.png is class 708
    magi = ds.alphabet_names.index("Alphabet_of_the_Magi")
    assert ds.class_source[708] == 708
    row = ds.class_images[708, 0]
    assert ds.image_alphabet[row] == magi and ds.image_drawer[row] == 1
    assert ds.image_alphabet[ds.class_images[707, 0]] != magi  # 0708 is another alphabet
    assert ds.images.dtype == np.uint8
    assert ds.images.min() == 0 and ds.images.max() == 1  # uint8, so exactly {0, 1}
    assert np.count_nonzero(ds.images) / ds.images.size > 0.9  # 1 = white background
    assert (ds.images[:, 0, :] == 1).mean() > 0.99  # borders are background
    # as the model sees them: float32, exactly 0.0 and 1.0
    sample = ds.images[ds.class_images[:, 0]].astype(np.float32)
    assert set(np.unique(sample).tolist()) == {0.0, 1.0}


def test_splits(cache_dir):
    train = load_dataset(_cfg(split="train"), cache_dir)
    test = load_dataset(_cfg(split="test"), cache_dir)
    assert (train.num_classes, test.num_classes) == (964, 659)
    assert train.images.shape[0] == 19_280 and test.images.shape[0] == 13_180
    assert test.class_source[0] == 964


def test_magi_png_pixels_match_the_cache(cache_dir):
    import io
    import zipfile

    from PIL import Image
    with zipfile.ZipFile(REAL / "images_background.zip") as zf:
        png = zf.read("images_background/Alphabet_of_the_Magi/character01/0709_01.png")
    want = np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8)
    ds = load_dataset(_cfg(), cache_dir)
    np.testing.assert_array_equal(ds.images[ds.class_images[708, 0]], want)
