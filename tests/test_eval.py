"""`eicl train` and `eicl eval` through the CLI, in process: outputs and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eicl_cli import runs
from eicl_cli.cli import app
from eicl_cli.eval_modes import fewshot_ceiling
from train_support import TINY

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EICL_DATA_DIR", str(data_dir))
        res = runner.invoke(app, ["train", "--config", str(TINY), "--out", str(run),
                                  "--set", "run.steps=20"])
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture(autouse=True)
def _env(data_dir: Path, monkeypatch):
    monkeypatch.setenv("EICL_DATA_DIR", str(data_dir))


def test_train_writes_the_run_folder(trained: Path):
    assert (trained / "config.toml").is_file()
    assert [s for s, _ in runs.list_checkpoints(trained)] == [10, 20]
    recs = runs.read_metrics(trained)
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20]
    for r in train:
        assert {"loss", "accuracy_query", "steps_per_s", "time", "lr", "mode"} <= set(r)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert sorted((r["step"], r["mode"]) for r in evals) == [
        (20, "fewshot_holdout"), (20, "no_support_zipfian")]
    assert all(r["sequences"] == 64 for r in evals)


def test_print_config_is_byte_identical_to_the_saved_config(trained: Path):
    res = runner.invoke(app, ["train", "--config", str(TINY), "--set", "run.steps=20",
                              "--print-config"])
    assert res.exit_code == 0, res.output
    saved = (trained / "config.toml").read_text()
    assert res.stdout == saved
    assert 'cache_sha256 = "' in saved and 'cache_sha256 = ""' not in saved


def test_print_model_lists_parameter_counts():
    res = runner.invoke(app, ["train", "--config", str(TINY), "--print-model"])
    assert res.exit_code == 0, res.output
    assert "total" in res.stdout and "head" in res.stdout


def test_eval_prints_every_configured_mode_and_repeats_exactly(trained: Path):
    a = runner.invoke(app, ["eval", str(trained), "--sequences", "150", "--json"])
    b = runner.invoke(app, ["eval", str(trained), "--sequences", "150", "--json"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["modes"] == jb["modes"]
    assert set(ja["modes"]) == {"no_support_zipfian", "fewshot_holdout"}
    assert ja["step"] == 20
    for m in ja["modes"].values():
        assert m["sequences"] == 150
        for k in ("accuracy_query", "accuracy_closed", "loss_query", "from_common", "from_rare",
                  "from_fewshot", "from_support", "from_support_common", "from_support_rare",
                  "from_support_fewshot"):
            assert 0.0 <= m[k] or k == "loss_query"
    assert ja["modes"]["fewshot_holdout"]["role"] == "ICL"
    assert ja["modes"]["no_support_zipfian"]["role"] == "IWL"
    assert ja["modes"]["fewshot_holdout"]["ceiling"] == pytest.approx(fewshot_ceiling(8, 2))


def test_eval_finds_the_cache_the_run_recorded(trained: Path, tmp_path: Path, monkeypatch):
    """From a shell whose EICL_DATA_DIR holds no cache, a run is evaluated
    with the cache its config.toml recorded; without a run, the error says
    how to point eicl at a cache."""
    monkeypatch.setenv("EICL_DATA_DIR", str(tmp_path / "empty"))
    res = runner.invoke(app, ["eval", str(trained), "--sequences", "50", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["step"] == 20
    res = runner.invoke(app, ["train", "--config", str(TINY), "--out", str(tmp_path / "new")])
    assert res.exit_code == 2
    assert "point eicl at the folder that holds it with EICL_DATA_DIR" in res.output
    assert not (tmp_path / "new").exists()


def test_eval_table_output_and_explicit_modes(trained: Path):
    ckpt = runs.checkpoint_path(trained, 10)
    res = runner.invoke(app, ["eval", str(ckpt), "--mode", "fewshot_rare", "--mode",
                              "no_support_common", "-n", "70"])
    assert res.exit_code == 0, res.output
    assert "step 10" in res.stdout
    lines = [l for l in res.stdout.splitlines() if l.startswith(("fewshot_rare",
                                                                  "no_support_common"))]
    assert len(lines) == 2 and "accuracy_closed" in lines[0] and "sequences 70" in lines[0]
    assert "(IWL)" in lines[1]


def test_eval_batches_do_not_change_the_numbers(trained: Path):
    """The mean is exact across batches: 1 batch of 150 == batches of 64, 64, 22."""
    from eicl_cli import evaluate
    restored, data, gen = evaluate.restore_for_eval(trained)
    args = (restored.model, restored.state, data, gen, ["fewshot_holdout"], 150)
    one = evaluate.evaluate_modes(*args, batch_size=150, seed=0)["fewshot_holdout"]
    three = evaluate.evaluate_modes(*args, batch_size=64, seed=0)["fewshot_holdout"]
    assert one["sequences"] == three["sequences"] == 150
    for k, v in one.items():
        # Other batch shapes are other programs: the same per-sequence values,
        # summed in another order in float32 (means of at most 150 terms).
        assert v == pytest.approx(three[k], abs=1e-5), k


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_eval_errors_are_one_line(trained: Path, tmp_path: Path):
    _one_line_error(runner.invoke(app, ["eval", str(trained), "--mode", "fewshot_bogus"]),
                    "fewshot_bogus", "fewshot_holdout")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.toml").write_text((trained / "config.toml").read_text())
    _one_line_error(runner.invoke(app, ["eval", str(empty)]), "no checkpoints")
    bad = tmp_path / "step_00000001.safetensors"
    bad.write_bytes(runs.checkpoint_path(trained, 20).read_bytes()[:5000])
    _one_line_error(runner.invoke(app, ["eval", str(bad)]), "corrupt or truncated")
    _one_line_error(runner.invoke(app, ["eval", str(tmp_path / "nothing")]), "does not exist")
    _one_line_error(runner.invoke(app, ["eval", str(trained), "-n", "0"]), "--sequences")


def test_train_errors_are_one_line(trained: Path, tmp_path: Path, data_dir: Path):
    # A checkpoint trained under another model than the (changed) config's.
    _one_line_error(runner.invoke(app, ["train", "--resume", str(trained), "--set",
                                        "run.steps=30", "--set", "embedding.emb_dim=48"]),
                    "embedding.emb_dim = 32 there, 48 here")
    assert "emb_dim = 32" in (trained / "config.toml").read_text()  # left as it was
    _one_line_error(runner.invoke(app, ["train", "--resume", str(tmp_path)]), "not a run folder")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("")
    _one_line_error(runner.invoke(app, ["train", "--config", str(TINY), "--out", str(occupied)]),
                    "not empty")
    _one_line_error(runner.invoke(app, ["train", "--config", str(TINY), "--set",
                                        "optimizer.name=adamm"]), "optimizer.name")
    # A folder that cannot be made (a file in its path), and a name that is a path.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    _one_line_error(runner.invoke(app, ["train", "--config", str(TINY), "--out",
                                        str(blocker / "run")]),
                    f"cannot create the run folder {blocker / 'run'}")
    escape = tmp_path / "out" / ".." / "escaped"
    _one_line_error(runner.invoke(app, ["train", "--config", str(TINY), "--set",
                                        f'run.out_dir="{tmp_path / "out"}"', "--set",
                                        'run.name="../escaped"']), "run.name = '../escaped'")
    assert not escape.exists() and not (tmp_path / "out").exists()


def test_resume_of_a_finished_run_says_so(trained: Path):
    res = runner.invoke(app, ["train", "--resume", str(trained)])
    assert res.exit_code == 0, res.output
    assert "already at step 20" in res.stdout
    # Asked for fewer steps than it has: nothing to do, and nothing rewritten.
    files = {name: (trained / name).read_bytes() for name in ("config.toml", "metrics.jsonl")}
    res = runner.invoke(app, ["train", "--resume", str(trained), "--set", "run.steps=10"])
    assert res.exit_code == 0, res.output
    assert "already at step 20 (run.steps = 10): nothing to do" in " ".join(res.stdout.split())
    assert files == {name: (trained / name).read_bytes() for name in files}


def test_fewshot_ceiling_is_exact():
    # 10 holdout classes, 2 ways: the two classes coincide 1 time in 10 and
    # then the best guess is right half the time: 0.9 + 0.1 / 2.
    assert fewshot_ceiling(10, 2) == pytest.approx(0.95)
    assert fewshot_ceiling(1000, 2) == pytest.approx(1 - 0.0005)
    # 3 ways from 2 classes, by enumeration of the 8 equally likely draws.
    import itertools
    total = 0.0
    for draw in itertools.product(range(2), repeat=3):
        for q in range(3):
            total += 1 / draw.count(draw[q]) / 3
    assert fewshot_ceiling(2, 3) == pytest.approx(total / 8)


def test_eval_of_a_run_skips_a_corrupt_newest_checkpoint(trained: Path, tmp_path: Path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    newest = runs.checkpoint_path(copy, 20)
    newest.write_bytes(newest.read_bytes()[:-64])
    res = runner.invoke(app, ["eval", str(copy), "-n", "20", "--json"])
    assert res.exit_code == 0, res.output
    assert "skipping step_00000020.safetensors" in res.stderr
    assert json.loads(res.stdout)["step"] == 10


def test_a_sweep_file_or_a_non_checkpoint_is_refused_by_name(trained: Path):
    sweep_file = Path(__file__).resolve().parents[1] / "configs/sweeps/burstiness.toml"
    _one_line_error(runner.invoke(app, ["train", "--config", str(sweep_file)]),
                    "'description' is a sweep file's key, not a config's")
    _one_line_error(runner.invoke(app, ["eval", str(trained / "config.toml")]),
                    "is not a checkpoint: give a run folder")
