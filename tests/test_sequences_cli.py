"""`eicl sample`: tables, JSON lines and the PNG grid, on symbolic data and a
tiny synthetic cache; plus the pixel materialisation the grid shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from eicl_cli import config as config_mod
from eicl_cli.cli import app
from eicl_cli.data.cache import cache_path, write_cache
from eicl_cli.data.dataset import load_dataset
from eicl_cli.data.sequences import SequenceGenerator
from eicl_cli.data.synthetic import synthetic_raw
from eicl_cli.sample_png import CAPTION, MIN_CELL, PAD, materialise
from train_support import deadline

runner = CliRunner()
SYMBOLIC = ["--set", "data.dataset=symbolic", "--set", "embedding.example_encoder=embedding",
            "--set", "classes.n_rare=980"]
TINY = ["--set", "data.dataset=synthetic", "--set", "classes.n_rare=20",
        "--set", "classes.n_common=6", "--set", "classes.n_holdout=6"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic cache of 32 classes x 5 drawings of 28 x 28 pixels."""
    root = tmp_path_factory.mktemp("data")
    write_cache(synthetic_raw(32, 5, 28, seed=0), cache_path(root, "synthetic"))
    return root


def invoke(*args: str):
    return runner.invoke(app, ["sample", *args])


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_table_marks_the_query(tmp_path: Path) -> None:
    res = invoke(*SYMBOLIC, "-n", "2", "--mode", "fewshot_holdout", "--png", str(tmp_path / "s.png"))
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "s.png") as im:  # symbolic items are drawn as their integer
        assert im.size == (PAD + 9 * (MIN_CELL + PAD), PAD + 2 * (MIN_CELL + CAPTION + PAD))
    assert "sequence 0" in res.output and "sequence 1" in res.output
    assert res.output.count("\n query ") == 2
    assert "label" in res.output and "omniglot" in res.output


def test_json_lines_are_seeded_sequences() -> None:
    res = invoke(*SYMBOLIC, "-n", "5", "--mode", "fewshot_holdout", "--json", "--seed", "4")
    assert res.exit_code == 0, res.output
    recs = json_lines(res.output)
    assert len(recs) == 5
    for r in recs:
        assert {"classes", "labels", "image_index", "drawers", "is_rare"} <= set(r)
        assert len(r["labels"]) == 4 * 2 + 1  # fs_shots x ways + 1
        assert set(r["labels"]) <= {0, 1} and r["classes"][-1] in r["classes"][:-1]
    again = json_lines(invoke(*SYMBOLIC, "-n", "5", "--mode", "fewshot_holdout", "--json",
                              "--seed", "4").output)
    other = json_lines(invoke(*SYMBOLIC, "-n", "5", "--mode", "fewshot_holdout", "--json",
                              "--seed", "5").output)
    assert recs == again and recs != other


def test_step_shows_the_training_batch(data_dir: Path) -> None:
    res = invoke(*TINY, "--data-dir", str(data_dir), "-n", "3", "--step", "7", "--json")
    assert res.exit_code == 0, res.output
    cfg = config_mod.from_dict(config_mod.apply_overrides({}, TINY[1::2]))
    want = SequenceGenerator(load_dataset(cfg, data_dir), cfg).train_batch(7)
    assert [r["image_index"] for r in json_lines(res.output)] == want.image_index[:3].tolist()


def test_png_grid(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    res = invoke(*TINY, "--data-dir", str(data_dir), "-n", "3", "--png", str(out))
    assert res.exit_code == 0, res.output
    assert "written to" in res.output
    with Image.open(out) as im:
        cell = 28 * 3  # 28-pixel images enlarged to at least MIN_CELL
        assert cell >= MIN_CELL
        assert im.size == (PAD + 9 * (cell + PAD), PAD + 3 * (cell + CAPTION + PAD))
        pixels = np.asarray(im.convert("L"))
    assert pixels.min() == 0 and pixels.max() == 255  # ink and paper were drawn
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_user_errors_are_one_line(data_dir: Path, tmp_path: Path) -> None:
    res = invoke("--set", "data.dataset=synthetic", "--data-dir", str(data_dir))
    assert res.exit_code == 2
    assert "1623" in res.output and "32 classes" in res.output
    res = invoke("--set", "data.dataset=synthetic", "--data-dir", str(tmp_path))
    assert res.exit_code == 2 and "eicl prepare-data" in res.output
    res = invoke(*SYMBOLIC, "--mode", "bursts")
    assert res.exit_code == 2 and "bursty" in res.output
    res = invoke(*SYMBOLIC, "--mode", "fewshot_rare", "--step", "3")
    assert res.exit_code == 2 and "--step" in res.output


@pytest.mark.parametrize("setting", ["classes.zipf_exponent=1100", "classes.zipf_exponent=inf",
                                     "classes.zipf_exponent=nan", "sequences.noise_scale=nan"])
def test_absurd_values_are_one_line_not_a_hang(setting: str) -> None:
    # zipf_exponent = 1100 or inf made no-support sequences redraw forever.
    with deadline(20):
        res = invoke(*SYMBOLIC, "--mode", "no_support_zipfian", "--set", setting)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {setting.split('=')[0]} = ")


def test_a_damaged_cache_is_one_line_exit_2(data_dir: Path, tmp_path: Path) -> None:
    data = bytearray(cache_path(data_dir, "synthetic").read_bytes())
    data[-1] ^= 0x01
    cache_path(tmp_path, "synthetic").write_bytes(bytes(data))
    res = invoke(*TINY, "--data-dir", str(tmp_path))
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: cache {cache_path(tmp_path, 'synthetic')} is corrupt: its content does not "
        "match the checksum recorded when it was built; rebuild it with `eicl prepare-data "
        "--force`"]


def test_materialise_applies_variants_noise_and_random_rare(data_dir: Path) -> None:
    over = TINY[1::2] + ["data.augment_images=true", "classes.n_rare=200", "classes.n_common=24",
                         "classes.n_holdout=32", "classes.preserve_ordering_every_n=8",
                         "sequences.randomly_generate_rare=true", "sequences.p_bursty=1.0",
                         "sequences.p_bursty_zipfian=0.0"]
    cfg = config_mod.from_dict(config_mod.apply_overrides({}, over))
    ds = load_dataset(cfg, data_dir)
    batch = SequenceGenerator(ds, cfg).batch("bursty", 20, np.random.default_rng(0))
    px = materialise(batch, ds, cfg)
    assert px.shape == (20, 9, 28, 28)
    common = ~batch.is_rare
    b, p = np.nonzero(common)
    from eicl_cli.data.augment import apply_variant
    for i, j in zip(b[:10], p[:10]):
        raw = ds.images[batch.image_index[i, j]].astype(np.float32)
        assert np.array_equal(px[i, j], apply_variant(raw, int(batch.variant[i, j])))
    for i in range(20):  # every occurrence of a rare class shows the same random image
        for c in np.unique(batch.class_index[i][batch.is_rare[i]]):
            imgs = px[i][batch.class_index[i] == c]
            assert all(np.array_equal(imgs[0], im) for im in imgs[1:])
    noisy = materialise(batch, ds, config_mod.from_dict(config_mod.apply_overrides(
        {}, over + ["sequences.noise_scale=0.3"])))
    assert 0.0 < np.abs(noisy - px).mean() < 0.5


OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.mark.real_data
@pytest.mark.skipif(not (OMNIGLOT / "images_background.zip").is_file(),
                    reason="real Omniglot zips not present")
def test_real_omniglot_paper_split_and_drawings() -> None:
    from eicl_cli.data.dataset import from_raw
    from eicl_cli.data.omniglot import find_local, local_fingerprint, read_local

    parts = find_local(OMNIGLOT)
    ds = from_raw(read_local(parts, local_fingerprint(parts)))
    gen = SequenceGenerator(ds, config_mod.load(
        Path(__file__).resolve().parents[1] / "configs" / "images_all_exemplars.toml"))
    # dataset class c is Omniglot character c (TFDS label), so the split names the same characters
    assert ds.class_source[gen.split.common].tolist() == [580, 243, 1316, 493, 171, 1006, 524, 864, 387, 170]
    assert ds.class_source[gen.split.holdout].tolist() == [198, 184, 1152, 480, 336, 583, 614, 575, 168, 585]
    b = gen.train_batch(0)
    drawers = ds.image_drawer[b.image_index]
    for row_c, row_d in zip(b.class_index, drawers):
        for c in np.unique(row_c):
            d = row_d[row_c == c]
            assert len(set(d.tolist())) == len(d)  # different drawers of one character
