"""`eicl prepare-data` from local sources, and every bad input refused with
one line naming the file, leaving no cache or partial file behind."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from eicl_cli.cli import app
from eicl_cli.data.cache import read_cache
from eicl_cli.errors import EiclError
from eicl_cli.prepare import prepare_data
from omniglot_fixture import png_bytes, write_fake_omniglot
from test_data_dataset import without_checksum

URLS = ("images_background.zip", "images_evaluation.zip")

runner = CliRunner()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_omniglot(tmp_path_factory.mktemp("fake"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_build_from_zips_then_up_to_date_then_force(fake, tmp_path):
    r = prepare_data(str(fake.folder), tmp_path)
    assert not r.skipped and r.kind == "omniglot" and not r.synthetic
    assert (r.n_alphabets, r.n_classes, r.n_images) == (4, 12, 240)
    assert (r.n_background_classes, r.n_evaluation_classes) == (6, 6)
    raw, _ = read_cache(r.path)
    np.testing.assert_array_equal(raw.images, fake.images)
    np.testing.assert_array_equal(raw.image_class, fake.image_class)
    np.testing.assert_array_equal(raw.image_drawer, fake.image_drawer)
    assert raw.alphabet_names == fake.alphabets
    assert raw.character_names[4] == "Fake_Background_2/character02"
    assert raw.character_names[7] == "Fake_Evaluation_1/character02"
    assert fake.background_zip.name in raw.source_sha256  # the zips' own checksums
    mtime = r.path.stat().st_mtime_ns
    again = prepare_data(str(fake.folder), tmp_path)
    assert again.skipped and r.path.stat().st_mtime_ns == mtime
    forced = prepare_data(str(fake.folder), tmp_path, force=True)
    assert not forced.skipped
    assert leftovers(tmp_path) == ["omniglot.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_cache_gets_the_mode_of_an_ordinary_file(fake, tmp_path, umask):
    """The cache is written through a unique temporary file (mkstemp, mode
    0600); it must end with the umask's mode, so a lab can share one folder."""
    import os
    old = os.umask(umask)
    try:
        r = prepare_data(str(fake.folder), tmp_path)
    finally:
        os.umask(old)
    assert r.path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_one_zip_path_and_extracted_folders_give_the_same_cache(fake, tmp_path):
    a = prepare_data(str(fake.background_zip), tmp_path / "a")
    tree = write_fake_omniglot(tmp_path / "tree", extracted=True)
    b = prepare_data(str(tree.folder), tmp_path / "b")
    ra, _ = read_cache(a.path)
    rb, _ = read_cache(b.path)
    np.testing.assert_array_equal(ra.images, rb.images)
    assert ra.character_names == rb.character_names
    assert prepare_data(str(tree.folder), tmp_path / "b").skipped


def test_a_relative_source_is_recorded_as_an_absolute_path(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(fake.folder.parent)
    r = prepare_data(fake.folder.name, tmp_path)
    assert r.source and all(Path(p).is_absolute() for p in r.source.split(", "))
    assert str(fake.background_zip.resolve()) in r.source


def test_cli_synthetic_summary_and_rerun(tmp_path):
    args = ["prepare-data", "--source", "synthetic", "--classes", "10", "--data-dir", str(tmp_path)]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "SYNTHETIC" in out.output and "200" in out.output
    raw, _ = read_cache(tmp_path / "synthetic.safetensors")
    assert raw.meta["synthetic"] == "true" and raw.num_classes == 10
    out = runner.invoke(app, args)
    assert out.exit_code == 0 and "up to date" in out.output


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EICL_DATA_DIR", str(tmp_path / "env"))
    out = runner.invoke(app, ["prepare-data", "--source", "synthetic", "--classes", "3"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "env" / "synthetic.safetensors").is_file()


def test_tfds_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    out = runner.invoke(app, ["prepare-data", "--source", "tfds", "--data-dir", str(tmp_path)])
    assert out.exit_code == 2
    assert "tensorflow-datasets is not installed" in out.output
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- bad inputs

def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copy a zip, letting edit(name, data) return (name, data) or None to drop."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            res = edit(info.filename, zin.read(info))
            if res is not None:
                zout.writestr(res[0], res[1])


def _bad_copy(fake, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    _rewrite_zip(fake.background_zip, folder / "images_background.zip", edit)
    (folder / "images_evaluation.zip").write_bytes(fake.evaluation_zip.read_bytes())
    return folder


FIRST = "images_background/Fake_Background_1/character01/0001_01.png"


def _replace_first(data: bytes):
    return lambda name, old: (name, data) if name == FIRST else (name, old)


BAD = {
    "not 105 x 105": lambda fake: _replace_first(png_bytes(np.ones((28, 28), np.uint8))),
    "not a decodable image": lambda fake: _replace_first(b"\x89PNG\r\n\x1a\nnot really"),
    "unexpected path": lambda fake: lambda n, d: (n.replace("character01/", ""), d)
    if n.startswith("images_background/Fake_Background_1/character01/0") else (n, d),
    "has drawers": lambda fake: lambda n, d: None if n == FIRST else (n, d),
    "should hold images_background": lambda fake: lambda n, d: (
        n.replace("images_background/", "images_evaluation/", 1), d),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_zip_contents_refused(fake, tmp_path, problem):
    folder = _bad_copy(fake, tmp_path, BAD[problem](fake))
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["prepare-data", "--source", str(folder), "--data-dir", str(out_dir)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and problem in line and "images_background.zip" in line
    assert leftovers(out_dir) == []


def test_missing_path_refused(tmp_path):
    result = runner.invoke(app, ["prepare-data", "--source", str(tmp_path / "nope"),
                                 "--data-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "nope: no such file or folder" in result.output
    assert "'tfds' or 'synthetic'" in " ".join(result.output.split())  # a misspelt word, say
    assert leftovers(tmp_path / "out") == []


def test_folder_without_the_zips_refused(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(EiclError, match="missing images_background.zip"):
        prepare_data(str(tmp_path / "src"), tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_zip_refused(fake, tmp_path, damage):
    folder = tmp_path / "src"
    folder.mkdir()
    data = fake.background_zip.read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" + bytes(5000)
    (folder / "images_background.zip").write_bytes(bad)
    (folder / "images_evaluation.zip").write_bytes(fake.evaluation_zip.read_bytes())
    with pytest.raises(EiclError, match=r"images_background\.zip.*(corrupt|truncated)"):
        prepare_data(str(folder), tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


def test_corrupt_member_inside_zip_refused(fake, tmp_path):
    """A zip whose directory is intact but one member's bytes are damaged."""
    folder = tmp_path / "src"
    folder.mkdir()
    data = bytearray(fake.background_zip.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(FIRST)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start, start + info.compress_size):
        data[i] ^= 0x5A
    (folder / "images_background.zip").write_bytes(bytes(data))
    (folder / "images_evaluation.zip").write_bytes(fake.evaluation_zip.read_bytes())
    with pytest.raises(EiclError, match=r"images_background\.zip"):
        prepare_data(str(folder), tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


def test_failed_rebuild_keeps_the_old_cache(fake, tmp_path):
    good = prepare_data(str(fake.folder), tmp_path / "out")
    before = good.path.read_bytes()
    folder = _bad_copy(fake, tmp_path, BAD["not 105 x 105"](fake))
    with pytest.raises(EiclError):
        prepare_data(str(folder), tmp_path / "out", force=True)
    assert good.path.read_bytes() == before
    assert leftovers(tmp_path / "out") == ["omniglot.safetensors"]


def _flip_one_image_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 100] ^= 0x01  # 8 pixels of image 0
    path.write_bytes(bytes(data))


CACHE_FAULTS = {
    "a flipped bit": (_flip_one_image_byte, "its content does not match the checksum"),
    "cut short": (lambda p: p.write_bytes(p.read_bytes()[:20_000]),
                  "bytes where its header describes"),
    "no checksum": (lambda p: without_checksum(p), "built by an older eicl, without a checksum"),
}


@pytest.mark.parametrize("fault", sorted(CACHE_FAULTS))
def test_a_damaged_or_unchecked_cache_is_rebuilt_not_up_to_date(fake, tmp_path, fault):
    damage, why = CACHE_FAULTS[fault]
    good = prepare_data(str(fake.folder), tmp_path)
    intact = read_cache(good.path)[0]
    damage(good.path)
    again = prepare_data(str(fake.folder), tmp_path)
    assert not again.skipped and why in again.note
    np.testing.assert_array_equal(read_cache(again.path)[0].images, intact.images)
    assert prepare_data(str(fake.folder), tmp_path).skipped  # and now intact
    assert leftovers(tmp_path) == ["omniglot.safetensors"]


def test_without_a_source_a_damaged_cache_is_rebuilt_and_an_unchecked_one_kept(fake, tmp_path):
    # No --source: the cache is taken from wherever it came; a damaged one
    # goes to the official download (here a stand-in that fails at once).
    good = prepare_data(str(fake.folder), tmp_path)
    without_checksum(good.path)
    kept = prepare_data(None, tmp_path, urls={n: "http://127.0.0.1:9/x" for n in URLS},
                        expected={n: (1, "0" * 64) for n in URLS})
    assert kept.skipped and "holds no checksum (an older eicl built it)" in kept.note
    prepare_data(str(fake.folder), tmp_path, force=True)
    _flip_one_image_byte(good.path)
    with pytest.raises(EiclError, match="is corrupt: its content does not match the checksum .*; "
                                        "fetching the official zips to rebuild it failed: "
                                        "download of images_background.zip"):
        prepare_data(None, tmp_path, urls={n: "http://127.0.0.1:9/x" for n in URLS},
                     expected={n: (1, "0" * 64) for n in URLS})


def test_cli_says_why_it_rebuilt_a_cache(tmp_path):
    args = ["prepare-data", "--source", "synthetic", "--classes", "3", "--data-dir", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    _flip_one_image_byte(tmp_path / "synthetic.safetensors")
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "up to date" not in out.output
    assert "warning: rebuilt the cache: cache " in out.output and "is corrupt" in out.output


def test_classes_only_for_synthetic(fake, tmp_path):
    with pytest.raises(EiclError, match="--classes"):
        prepare_data(str(fake.folder), tmp_path, classes=5)


def test_tfds_failure_is_one_line_and_leaves_no_cache(tmp_path, monkeypatch):
    """TFDS's own errors (no network: a long urllib3 message) become one line."""
    import sys
    import types

    def builder(name):
        raise ConnectionError("HTTPSConnectionPool(host='github.com', port=443): Max retries\n"
                              "  (Caused by NameResolutionError(...))")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(builder=builder))
    out = runner.invoke(app, ["prepare-data", "--source", "tfds", "--data-dir", str(tmp_path)])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [
        "error: TFDS omniglot could not be loaded: HTTPSConnectionPool(host='github.com', "
        "port=443): Max retries"]
    assert leftovers(tmp_path) == []


def test_tfds_conversion_with_a_stand_in_module(fake, tmp_path, monkeypatch):
    """The TFDS path, fed by a minimal stand-in for tensorflow_datasets that
    serves the fixture's images as TFDS does (RGB, label, alphabet; no drawer;
    examples in a scrambled order)."""
    import sys
    import types

    order = np.random.default_rng(0).permutation(len(fake.images))
    n_bg = fake.n_background_classes * 20
    alphabet_of = np.repeat(np.arange(4), 60)

    def examples(split):
        rows = [i for i in order if (i < n_bg) == (split == "train")]
        for i in rows:
            rgb = np.repeat(fake.images[i][..., None] * 255, 3, axis=-1).astype(np.uint8)
            yield {"image": rgb, "label": np.int64(fake.image_class[i]),
                   "alphabet": np.int64(alphabet_of[i]),
                   "alphabet_char_id": np.int64(fake.image_class[i] % 3)}

    info = types.SimpleNamespace(
        features={"alphabet": types.SimpleNamespace(names=fake.alphabets)},
        version="3.0.0",
        splits={"train": types.SimpleNamespace(num_examples=n_bg),
                "test": types.SimpleNamespace(num_examples=len(fake.images) - n_bg)})
    builder = types.SimpleNamespace(info=info, download_and_prepare=lambda: None,
                                    as_dataset=lambda split, shuffle_files: examples(split))
    stand_in = types.SimpleNamespace(builder=lambda name: builder, as_numpy=lambda ds: ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", stand_in)

    r = prepare_data("tfds", tmp_path)
    assert (r.n_classes, r.n_images, r.n_background_classes) == (12, 240, 6)
    raw, _ = read_cache(r.path)
    assert raw.source_sha256 == "tfds:omniglot:3.0.0"
    np.testing.assert_array_equal(raw.image_class, fake.image_class)
    assert (np.sort(raw.image_drawer.reshape(12, 20), axis=1) == np.arange(1, 21)).all()
    # same drawings per class, whatever order TFDS numbered the drawers in
    got = np.sort(raw.images.reshape(12, 20, -1).sum(-1), axis=1)
    want = np.sort(fake.images.reshape(12, 20, -1).sum(-1), axis=1)
    np.testing.assert_array_equal(got, want)
    assert raw.character_names[3] == "Fake_Background_2/character01"
    assert prepare_data("tfds", tmp_path).skipped
