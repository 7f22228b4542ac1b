"""End to end: a 2 x 2 sweep (p_bursty x seed) of the tiny synthetic config
through real `eicl train` processes, stopped with Ctrl+C (SIGINT) while the
second run trains, restarted without redoing the finished run, then read back
by `eicl report` as a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from eicl_cli import runs, sweep
from eicl_cli.cli import app
from train_support import interrupt_when, sweep_process, tiny_sweep_file

STEPS = 400


def _attempts(out: Path, name: str) -> list[str]:
    log = out / "logs" / f"{name}.log"
    return [l for l in log.read_text().splitlines() if l.startswith("=== ")]


@pytest.mark.slow
def test_tiny_sweep_interrupt_restart_report(data_dir: Path, tmp_path: Path) -> None:
    sweep_file = tiny_sweep_file(
        tmp_path / "tiny_sweep.toml",
        {"run.steps": STEPS, "run.eval_every": 100, "run.checkpoint_every": 10},
        {"sequences.p_bursty": [0.0, 0.9]})
    out = tmp_path / "sweep"
    names = [r.name for r in sweep.expand(sweep.load_sweep(sweep_file))]
    first, second = names[0], names[1]

    proc = sweep_process(sweep_file, out, data_dir, "--jobs", "1")
    # Ctrl+C once the first run is done and the second has saved a checkpoint.
    text = interrupt_when(proc, lambda: sweep.is_finished(out / first, STEPS)
                          and (sweep.run_progress(out / second) or 0) >= 10)
    assert proc.returncode == 130, text
    states = {s.name: s.state for s in sweep.statuses(out)}
    assert states[first] == "finished"
    assert states[second] == "interrupted", text
    assert 10 <= sweep.run_progress(out / second) < STEPS
    assert states[names[2]] == states[names[3]] == "pending"
    final_ckpt = runs.checkpoint_path(out / first, STEPS)
    stamp = final_ckpt.stat().st_mtime_ns

    proc = sweep_process(sweep_file, out, data_dir, "--jobs", "1")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert all(s.state == "finished" for s in sweep.statuses(out)), text
    assert len(_attempts(out, first)) == 1                     # not redone
    assert final_ckpt.stat().st_mtime_ns == stamp
    tries = _attempts(out, second)
    assert len(tries) == 2 and "--resume" in tries[1]           # resumed, not restarted
    evals = runs.read_metrics(out / second, kind="eval", mode="fewshot_holdout")
    assert [r["step"] for r in evals] == [100, 200, 300, 400]  # no step counted twice
    assert "finished" in text and "p_bursty" in text

    plot = tmp_path / "tiny.png"
    res = CliRunner().invoke(app, ["report", str(out), "--plot", str(plot)],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "ICL final" in res.output and "synthetic data" in res.output
    assert res.output.count("2/2") >= 2  # both points, both seeds
    assert Image.open(plot).size[0] >= 1000
    data = json.loads(CliRunner().invoke(app, ["report", str(out), "--json"]).output)
    assert [r["finished_runs"] for r in data["rows"]] == [2, 2]
    assert all(r["icl_accuracy_query"]["final"]["steps"] == [STEPS, STEPS] for r in data["rows"])
