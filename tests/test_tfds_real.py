"""`eicl prepare-data --source tfds` through the real tensorflow-datasets,
checked image by image against the cache built from the zips.

Runs only where the `tfds` extra is installed and the real Omniglot zips are
in ../shared/data/omniglot (CI has neither: it skips). There is no internet
here, so TFDS's download step is pointed at the local zips; everything after
it (TFDS's own walk of the folders, its PNG encoding, TFRecord writing and
reading) is the real thing.
"""

import functools
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from eicl_cli.data.cache import read_cache
from eicl_cli.prepare import prepare_data
from omniglot_fixture import NEEDS_REAL, REAL

tfds = pytest.importorskip("tensorflow_datasets")
pytestmark = [*NEEDS_REAL, pytest.mark.slow]


def _extract(zip_path: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(into)
    return into


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    train = _extract(REAL / "images_background.zip", root / "x" / "train")
    evaluation = _extract(REAL / "images_evaluation.zip", root / "x" / "eval")
    # TFDS also builds its small1/small2 splits, which eicl never reads; one
    # real alphabet each keeps that step short and its label names consistent.
    small = {}
    for name, alphabet in (("small1", "Alphabet_of_the_Magi"), ("small2", "Anglo-Saxon_Futhorc")):
        dest = root / "x" / name / f"images_background_{name}" / alphabet
        shutil.copytree(train / "images_background" / alphabet, dest)
        small[name] = root / "x" / name
    local = {"train": train, "eval": evaluation, **small}

    def download_and_extract(self, urls):
        assert set(urls) == set(local), urls  # the four official zips
        return {k: local[k] for k in urls}

    mp = pytest.MonkeyPatch()
    mp.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    mp.setattr(tfds, "builder", functools.partial(tfds.builder, data_dir=str(root / "tfds_data")))
    try:
        from_tfds = prepare_data("tfds", root / "cache_tfds")
    finally:
        mp.undo()
    from_zips = prepare_data(str(REAL), root / "cache_zips")
    return read_cache(from_tfds.path)[0], read_cache(from_zips.path)[0]


def test_same_classes_alphabets_and_names(caches):
    t, z = caches
    assert len(t.images) == len(z.images) == 32_460
    assert t.source.startswith("tfds omniglot ")
    np.testing.assert_array_equal(t.image_class, z.image_class)
    np.testing.assert_array_equal(t.image_background, z.image_background)
    assert t.alphabet_names == z.alphabet_names
    np.testing.assert_array_equal(t.image_alphabet, z.image_alphabet)
    assert t.character_names == z.character_names


def test_same_twenty_drawings_per_class(caches):
    t, z = caches
    # Rows are sorted by (class, drawer); TFDS keeps no drawer, so compare each
    # class's drawings as a set (sorted by their bytes).
    tb = t.images.reshape(1623, 20, -1)
    zb = z.images.reshape(1623, 20, -1)
    key = lambda b: np.sort(b.view(f"V{b.shape[-1]}")[..., 0], axis=1)  # noqa: E731
    np.testing.assert_array_equal(key(tb), key(zb))
    assert (np.sort(t.image_drawer.reshape(1623, 20), axis=1) == np.arange(1, 21)).all()
