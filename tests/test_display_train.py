"""The training display: each evaluation shows the run's elapsed wall time
(the metrics' `time`, so a resumed run counts its earlier legs), and the
live table's legend is printed once, not after every evaluation."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from eicl_cli import display, runs
from train_support import tiny, train_run

ROWS = [{"mode": "fewshot_holdout", "role": "ICL", "accuracy_query": 0.85,
         "accuracy_closed": 0.9, "loss_query": 0.4, "ceiling": 0.95, "sequences": 64},
        {"mode": "no_support_zipfian", "role": "IWL", "accuracy_query": 0.1,
         "accuracy_closed": 0.1, "loss_query": 3.0, "ceiling": None, "sequences": 64}]
LEGEND = "IWL = in-weights learning"


def _console(monkeypatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=out, width=100, color_system=None))
    return out


def test_live_table_shows_elapsed_and_the_legend_once(monkeypatch):
    out = _console(monkeypatch)
    with display.TrainDisplay(100, 0, live=True) as view:
        view.eval_table(50, ROWS, elapsed=3725.4)
        view.eval_table(100, ROWS, elapsed=90061.0)
    text = out.getvalue()
    assert "evaluation at step 50 (1:02:05 elapsed)" in text
    assert "evaluation at step 100 (25:01:01 elapsed)" in text
    assert text.count(LEGEND) == 1 and text.index(LEGEND) < text.index("step 100")


def test_plain_lines_show_elapsed_and_without_it_nothing(monkeypatch):
    out = _console(monkeypatch)
    with display.TrainDisplay(100, 0, live=False) as view:
        view.eval_table(50, ROWS, elapsed=59.6)
        view.eval_table(60, ROWS)
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["eval step 50 (0:01:00 elapsed)"] * 2 + \
        ["eval step 60"] * 2
    # `eicl eval`'s own table keeps its legend.
    assert LEGEND in _render(display.eval_table(ROWS, "t"))
    assert LEGEND not in _render(display.eval_table(ROWS, "t", legend=False))


def _render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=100).print(table)
    return out.getvalue()


def test_training_shows_the_metrics_time_at_each_evaluation(data_dir: Path, tmp_path: Path,
                                                            monkeypatch):
    out = _console(monkeypatch)
    cfg = tiny(data_dir, "run.steps=4", "run.eval_every=2", "run.log_every=2")
    train_run(cfg, tmp_path / "run")
    shown = {int(step): _seconds(hms) for step, hms in
             re.findall(r"eval step (\d+) \((\d+:\d\d:\d\d) elapsed\)", out.getvalue())}
    logged = {r["step"]: r["time"] for r in runs.read_metrics(tmp_path / "run", kind="eval")}
    assert shown.keys() == logged.keys() and len(shown) >= 2
    for step, seconds in shown.items():
        assert abs(seconds - logged[step]) <= 1, (step, seconds, logged[step])


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s
