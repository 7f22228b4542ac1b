"""A sweep dry run's expected training time: exact arithmetic from a given
steps/s (stacked tasks counted once), a measured figure per compiled
program, and bad input refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from eicl_cli import cost, display
from eicl_cli.cli import app
from eicl_cli.errors import EiclError
from train_support import TINY, tiny


def _pending(data_dir: Path) -> list[cost.PendingRun]:
    cfgs = [tiny(data_dir, "run.steps=1000", f"run.seed={s}") for s in range(4)]
    return [cost.PendingRun("a", cfgs[0], 0), cost.PendingRun("b", cfgs[1], 0),
            cost.PendingRun("c", cfgs[2], 400), cost.PendingRun("d", cfgs[3], 1000)]


def test_given_steps_per_s_arithmetic(tmp_path: Path):
    runs = _pending(tmp_path)
    one = cost.estimate(runs, 1, cost.given_rate(4.0), "given")
    assert [(r.name, r.steps_left, r.seconds, r.stacked_with) for r in one.runs] == [
        ("a", 1000, 250.0, 1), ("b", 1000, 250.0, 1), ("c", 600, 150.0, 1), ("d", 0, 0.0, 1)]
    assert one.seconds == 650.0 and one.source == "given"
    # Stacked: a and b (same program, same progress) share one task, counted once;
    # c is at another step, so it trains alone, as the sweep would run it.
    two = cost.estimate(runs, 2, cost.given_rate(4.0), "given")
    assert [(r.name, r.seconds, r.stacked_with) for r in two.runs] == [
        ("a", 250.0, 2), ("b", 250.0, 2), ("c", 150.0, 1), ("d", 0.0, 1)]
    assert two.seconds == 400.0


def test_durations_read_at_a_plan_s_precision():
    assert [display.duration(s) for s in (44.6, 725, 12000, 5 * 86400 + 4 * 3600 + 59)] == [
        "45s", "12m 05s", "3h 20m", "5d 04h"]


def test_measured_once_per_compiled_program(data_dir: Path):
    runs = _pending(data_dir)[:3]  # differ only in seed: one program
    seen = []
    rate = cost.measured_rate(1, steps=2, on_measure=lambda cfg, k: seen.append(k))
    est = cost.estimate(runs, 1, rate, cost.measured_source())
    assert seen == [1] and est.runs[0].steps_per_s > 0
    assert est.seconds == pytest.approx(2000 / est.runs[0].steps_per_s + 600 / est.runs[0].steps_per_s)
    assert est.source.startswith("measured on cpu")


def _sweep_file(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f'base = "{TINY.as_posix()}"\nseeds = [0, 1]\n[set]\n"run.steps" = 36000\n'
                    f'"data.data_dir" = "{data_dir.as_posix()}"\n'
                    '[grid]\n"sequences.p_bursty" = [0.5, 0.9]\n')
    return path


def test_cli_dry_run_with_given_steps_per_s(tmp_path: Path):
    result = CliRunner().invoke(app, ["sweep", str(_sweep_file(tmp_path, tmp_path)), "--dry-run",
                                      "--out", str(tmp_path / "out"), "--steps-per-s", "2"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "expected training time (given: --steps-per-s)" in result.output
    assert result.output.count("5h 00m") == 4  # 36,000 steps at 2 steps/s each
    assert "in all, one task after another: 20h 00m" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_measures_here_or_says_why_not(tmp_path: Path, data_dir: Path):
    sweep = _sweep_file(tmp_path, tmp_path / "no-cache")
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--dry-run", "--out", str(tmp_path / "o")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "4 pending" in result.output or result.output.count("pending") >= 4
    assert "no time estimate: cannot measure steps/s here" in result.output


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--steps-per-s", "0"], "error: --steps-per-s 0: must be > 0"),
    (["--dry-run", "--steps-per-s", "-3"], "error: --steps-per-s -3: must be > 0"),
    (["--steps-per-s", "5"], "error: --steps-per-s only applies to --dry-run"),
])
def test_cli_bad_steps_per_s_is_one_line(tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(_sweep_file(tmp_path, tmp_path)), "--out",
                                      str(out), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not out.exists()


def test_given_rate_refuses_non_positive():
    with pytest.raises(EiclError, match="must be > 0"):
        cost.given_rate(float("nan"))
