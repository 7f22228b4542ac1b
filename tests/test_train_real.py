"""`eicl train` / `eicl eval` end to end on the real Omniglot (skipped when absent):
the paper config's data and class split, a cut-down model, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eicl_cli import runs
from eicl_cli.prepare import prepare_data
from omniglot_fixture import NEEDS_REAL, REAL
from train_support import eicl

REPO = Path(__file__).resolve().parents[1]
pytestmark = [*NEEDS_REAL, pytest.mark.slow]


def test_paper_config_trains_and_evaluates_on_real_omniglot(tmp_path: Path):
    data_dir = tmp_path / "data"
    prepare_data(str(REAL), data_dir)
    run = tmp_path / "run"
    small = ["--set", "preproc.downsample=true", "--set", "transformer.num_layers=1",
             "--set", 'embedding.example_encoder="linear"',
             "--set", "run.steps=4", "--set", "run.log_every=2", "--set", "run.eval_every=4",
             "--set", "eval.train_sequences=32", "--set", "eval.batch_size=32"]
    res = eicl("train", "--config", str(REPO / "configs" / "images_all_exemplars.toml"),
               "--out", str(run), *small, data_dir=data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    saved = (run / "config.toml").read_text()
    assert 'dataset = "omniglot"' in saved and "omniglot.safetensors" in saved
    evals = runs.read_metrics(run, kind="eval")
    assert {r["mode"] for r in evals} == {"no_support_zipfian", "fewshot_zipfian",
                                          "fewshot_holdout"}
    a = eicl("eval", str(run), "-n", "40", "--json", data_dir=data_dir)
    assert a.returncode == 0, a.stderr
    ja = json.loads(a.stdout)
    assert ja["step"] == 4 and set(ja["modes"]) == {r["mode"] for r in evals}
    for m in ja["modes"].values():
        assert m["sequences"] == 40
    assert ja["modes"]["fewshot_holdout"]["ceiling"] == pytest.approx(0.95)
