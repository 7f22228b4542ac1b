"""`eicl sweep --stack K`: grouping runs into stacked tasks, and a 2 x 2
sweep trained as one stacked process, then continued."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from eicl_cli import runs, sweep
from eicl_cli.cli import app
from train_support import tiny_sweep_file


def _sweep_file(tmp_path: Path, steps: int, extra_grid: dict | None = None) -> Path:
    sets = {"run.steps": steps, "run.eval_every": steps, "run.log_every": 1,
            "run.checkpoint_every": 3}
    return tiny_sweep_file(tmp_path / "s.toml", sets,
                           {"sequences.p_bursty": [0.0, 0.9], **(extra_grid or {})})


def test_plan_groups_runs_of_equal_shapes_up_to_k(tmp_path: Path, data_dir: Path):
    spec = sweep.load_sweep(_sweep_file(tmp_path, 10, {"embedding.emb_dim": [16, 32]}))
    sweep_runs = sweep.expand(spec, [f'data.data_dir="{data_dir}"'])
    assert len(sweep_runs) == 8
    manifest = sweep.manifest_dict(spec, sweep_runs)
    todo = [(r.name, "pending") for r in sweep_runs]
    tasks = sweep.plan_stacked_tasks(tmp_path, todo, manifest, 3)
    # Two shapes (emb_dim 16, 32) of four runs each: 3 + 1 per shape.
    assert sorted(len(t.runs) for t in tasks) == [1, 1, 3, 3]
    for t in tasks:
        dims = {next(r for r in sweep_runs if r.name == n).config.embedding.emb_dim
                for n in t.runs}
        assert len(dims) == 1
        assert ("train-stack" in t.command) == (len(t.runs) > 1)


@pytest.mark.slow  # one stacked process (compiles once), then a resume
def test_stacked_sweep_writes_ordinary_runs_and_resumes(tmp_path: Path, data_dir: Path,
                                                        monkeypatch):
    monkeypatch.setenv("EICL_DATA_DIR", str(data_dir))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(_sweep_file(tmp_path, 6)), "--out", str(out),
                              "--stack", "4"])
    assert res.exit_code == 0, res.output
    names = [r["name"] for r in sweep.read_manifest(out)["runs"]]
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == [f"{names[0]}.log"]  # one process trained all four
    for name in names:
        assert sweep.is_finished(out / name, 6)
        assert [r["step"] for r in runs.read_metrics(out / name, kind="train")][-1] == 6
        assert runs.read_config(out / name).run.name == name
    # Cut the runs back to their step-3 checkpoints: the sweep resumes the four
    # as one stack and each run's metrics continue without repeats.
    for name in names:
        runs.checkpoint_path(out / name, 6).unlink()
    res = runner.invoke(app, ["sweep", str(_sweep_file(tmp_path, 6)), "--out", str(out),
                              "--stack", "4"])
    assert res.exit_code == 0, res.output
    log = (out / "logs" / f"{names[0]}.log").read_text()
    assert log.count("=== ") == 2 and "train-stack" in log
    for name in names:
        assert sweep.is_finished(out / name, 6)
        steps = [r["step"] for r in runs.read_metrics(out / name, kind="train")]
        assert steps == [1, 2, 3, 4, 5, 6]
