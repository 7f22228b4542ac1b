"""`eicl report`: final and best ICL/IWL per run and per sweep point (mean and
std over seeds), marks for synthetic data and differing eval modes, JSON/CSV,
a PNG of learning curves, and one-line errors. Run folders are written here
by hand, with the layout and record format of runs.py."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from eicl_cli import config as C
from eicl_cli import eval_modes, report, runs, sweep
from eicl_cli.cli import app
from eicl_cli.errors import EiclError

ROOT = Path(__file__).resolve().parents[1]
STEPS = [1000, 2000, 3000, 4000, 5000]


def icl_curve(p_bursty: float, seed: int) -> list[float]:
    """Rising with burstiness, peaking before the end (so best != final)."""
    peak = 0.2 + 0.7 * p_bursty + 0.01 * seed
    return [round(peak * f, 4) for f in (0.1, 0.4, 0.8, 1.0, 0.95)]


def iwl_curve(p_bursty: float, seed: int) -> list[float]:
    top = 0.9 - 0.6 * p_bursty - 0.02 * seed
    return [round(top * f, 4) for f in (0.2, 0.5, 0.7, 0.9, 1.0)]


def make_run(path: Path, cfg: C.Config, icl: list[float], iwl: list[float],
             steps: list[int] = STEPS, checkpoint: int | None = None,
             loss: list[float] | None = None) -> Path:
    """A run folder with a train record (training loss `loss[i]`, by default
    falling; none where `loss` is empty) and an eval record per mode at each step."""
    path.mkdir(parents=True)
    (path / "checkpoints").mkdir()
    runs.write_config(path, cfg)
    iwl_mode = eval_modes.iwl_mode(cfg.eval.modes)
    loss = [2.0 - i * 0.3 for i in range(len(steps))] if loss is None else loss
    for i, step in enumerate(steps):
        if loss:
            runs.append_metrics(path, {"kind": "train", "step": step, "time": step / 100.0,
                                       "steps_per_s": 100.0, "loss": loss[i]})
        for mode in cfg.eval.modes:
            acc = icl[i] if mode == "fewshot_holdout" else iwl[i] if mode == iwl_mode else 0.3
            runs.append_metrics(path, {"kind": "eval", "step": step, "time": step / 100.0,
                                       "mode": mode, "sequences": 1000, "accuracy_query": acc,
                                       "accuracy_closed": min(1.0, 0.5 + acc / 2),
                                       "loss_query": 1.0 - acc / 2})
    ckpt = steps[-1] if checkpoint is None else checkpoint
    (path / "checkpoints" / f"step_{ckpt:08d}.safetensors").write_bytes(b"x")
    return path


def base_cfg(**sections: dict) -> C.Config:
    raw = {"run": {"steps": STEPS[-1]}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return C.from_dict(raw)


def write_sweep(folder: Path, tables: str, seeds: str = "[0, 1]",
                edit=lambda i, cfg: cfg, metrics=None) -> Path:
    """A sweep folder over the paper config whose runs hold hand-written
    metrics; `edit(i, config)` may change the config point i is trained
    with, `metrics(run)` (a sweep.SweepRun) gives make_run's curves."""
    sweep_file = folder / "sweep.toml"
    sweep_file.write_text(textwrap.dedent(f"""
        base = "{(ROOT / 'configs' / 'images_all_exemplars.toml').as_posix()}"
        description = "fixture"
        seeds = {seeds}
        [set]
        "run.steps" = {STEPS[-1]}
        """) + textwrap.dedent(tables))
    spec = sweep.load_sweep(sweep_file)
    points = sweep.expand(spec)
    out = folder / "sweep_out"
    out.mkdir()
    sweep.write_manifest(out, spec, points)
    for i, p in enumerate(points):
        pb = p.config.sequences.p_bursty
        curves = (metrics(p) if metrics else
                  {"icl": icl_curve(pb, p.seed), "iwl": iwl_curve(pb, p.seed)})
        make_run(out / p.name, edit(i, p.config), **curves)
    return out


@pytest.fixture
def fixture_sweep(tmp_path: Path) -> Path:
    """A 2-point x 2-seed sweep folder whose runs hold hand-written metrics."""
    return write_sweep(tmp_path, """
        [grid]
        "sequences.p_bursty" = [0.0, 0.9]
        """)


def test_single_run_final_and_best(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r1", base_cfg(), icl_curve(0.9, 0), iwl_curve(0.9, 0))
    rows, keys = report.collect([run])
    assert keys == [] and len(rows) == 1
    row = rows[0]
    icl, iwl = icl_curve(0.9, 0), iwl_curve(0.9, 0)
    final = row.stat("ICL", "accuracy_query", "final")
    best = row.stat("ICL", "accuracy_query", "best")
    assert (final.mean, final.steps, final.std) == (icl[-1], [5000], None)
    assert (best.mean, best.steps) == (max(icl), [4000])
    assert row.stat("IWL", "accuracy_query", "best").mean == max(iwl)
    assert row.stat("ICL", "accuracy_closed", "final").mean == pytest.approx(0.5 + icl[-1] / 2)
    assert row.iwl_mode == "no_support_zipfian"
    assert row.ceiling == pytest.approx(0.95)
    assert row.notes == []


def test_a_runs_copy_reports_as_the_run(tmp_path: Path) -> None:
    """docs/results keeps runs as NAME.config.toml + NAME.metrics.jsonl, no
    checkpoints: given the metrics file, or a folder of such pairs, report
    reads them as the runs they were."""
    made = [make_run(tmp_path / f"seed{i}", base_cfg(run={"seed": i}), icl_curve(0.9, i),
                     iwl_curve(0.9, i)) for i in range(2)]
    copies = tmp_path / "copies"
    copies.mkdir()
    for run in made:
        (copies / f"{run.name}.config.toml").write_bytes((run / "config.toml").read_bytes())
        (copies / f"{run.name}.metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes())
    (copies / "stray.metrics.jsonl").write_text("")  # no config beside it: not a copy

    def summary(rows):
        return [(r.label, len(r.runs), r.stat("ICL", "accuracy_query", "best").mean,
                 r.stat("IWL", "accuracy_query", "final").mean) for r in rows]

    from_runs = summary(report.collect(made)[0])
    assert summary(report.collect([copies / "seed0.metrics.jsonl",
                                   copies / "seed1.metrics.jsonl"])[0]) == from_runs
    assert summary(report.collect([copies])[0]) == from_runs
    assert [r.name for r in report.collect([copies], pool=False)[0][0].runs] == ["seed0"]
    assert report.title([copies], report.collect([copies], pool=False)[0]) == "copies"
    assert report.title([copies / "seed1.metrics.jsonl"]) == "seed1"
    res = CliRunner().invoke(app, ["report", str(copies / "stray.metrics.jsonl")])
    assert res.exit_code == 2 and "nor a run's copy" in res.output


def test_sweep_rows_mean_and_std_over_seeds(fixture_sweep: Path) -> None:
    rows, keys = report.collect([fixture_sweep])
    assert keys == ["sequences.p_bursty"]
    assert [r.values["sequences.p_bursty"] for r in rows] == [0.0, 0.9]
    assert [len(r.runs) for r in rows] == [2, 2]
    for row in rows:
        pb = row.values["sequences.p_bursty"]
        finals = [icl_curve(pb, s)[-1] for s in (0, 1)]
        st = row.stat("ICL", "accuracy_query", "final")
        assert st.mean == pytest.approx(statistics.fmean(finals))
        assert st.std == pytest.approx(statistics.stdev(finals))
        iwl_best = [max(iwl_curve(pb, s)) for s in (0, 1)]
        assert row.stat("IWL", "accuracy_query", "best").mean == pytest.approx(
            statistics.fmean(iwl_best))
        steps, means, stds = row.curve("ICL", "accuracy_query")
        assert steps == STEPS and stds[0] is not None
        assert means[2] == pytest.approx(statistics.fmean(icl_curve(pb, s)[2] for s in (0, 1)))
    # The science the fixture encodes comes out: burstier -> more ICL, less IWL.
    assert (rows[1].stat("ICL", "accuracy_query", "final").mean
            > rows[0].stat("ICL", "accuracy_query", "final").mean)
    assert (rows[1].stat("IWL", "accuracy_query", "final").mean
            < rows[0].stat("IWL", "accuracy_query", "final").mean)


def test_marks_synthetic_differing_modes_and_unfinished(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", base_cfg(), icl_curve(0.9, 0), iwl_curve(0.9, 0))
    b = make_run(tmp_path / "b", base_cfg(data={"dataset": "synthetic"}),
                 icl_curve(0.5, 0), iwl_curve(0.5, 0))
    c = make_run(tmp_path / "c", base_cfg(eval={"modes": ["no_support_common", "fewshot_holdout"]}),
                 icl_curve(0.0, 0), iwl_curve(0.0, 0))
    d = make_run(tmp_path / "d", base_cfg(), icl_curve(0.9, 1)[:3], iwl_curve(0.9, 1)[:3],
                 steps=STEPS[:3])
    e = make_run(tmp_path / "e", base_cfg(), icl_curve(0.9, 2), iwl_curve(0.9, 2))
    for f in (e / "checkpoints").iterdir():  # results kept without their checkpoints
        f.unlink()
    rows, keys = report.collect([a, b, c, d, e])
    assert "data.dataset" in keys and "eval.modes" in keys
    notes = {r.label: r.notes for r in rows}
    assert notes["a"] == [] and notes["e"] == []
    assert notes["b"] == ["synthetic data"]
    assert notes["c"][0].startswith("eval modes differ")
    assert notes["d"] == ["0/1 runs finished"]
    assert {r.label: r.iwl_mode for r in rows}["c"] == "no_support_common"
    headers, cells, foot = report.table(rows, keys)
    assert "IWL mode" in headers
    assert any("synthetic" in n for n in foot)


def test_json_and_csv(fixture_sweep: Path) -> None:
    rows, keys = report.collect([fixture_sweep])
    data = json.loads(report.to_json(rows, keys))
    assert data["swept_keys"] == keys and len(data["rows"]) == 2
    r0 = data["rows"][0]
    assert r0["values"]["sequences.p_bursty"] == 0.0
    assert r0["icl_accuracy_query"]["best"]["steps"] == [4000, 4000]
    assert r0["iwl_mode"] == "no_support_zipfian" and r0["synthetic"] is False
    assert r0["icl_ceiling"] == pytest.approx(0.95)
    table = list(csv.DictReader(io.StringIO(report.to_csv(rows, keys))))
    assert len(table) == 2 and table[1]["sequences.p_bursty"] == "0.9"
    assert float(table[1]["icl_accuracy_query_final_mean"]) == pytest.approx(
        statistics.fmean(icl_curve(0.9, s)[-1] for s in (0, 1)))
    assert table[1]["icl_accuracy_query_final_step"] == "5000"


def test_the_table_is_laid_out_for_the_columns_the_command_runs_with(
        fixture_sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that imported eicl under a narrow COLUMNS (here: its
    consoles made anew under 60) and runs `report` under a wide one gets the
    wide table, with every column."""
    from eicl_cli import display
    monkeypatch.setenv("COLUMNS", "60")
    display.use_current_environment()
    monkeypatch.delenv("COLUMNS")
    res = CliRunner().invoke(app, ["report", str(fixture_sweep)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "ICL final" in res.output and max(map(len, res.output.splitlines())) > 100


def test_cli_table_json_csv_and_plot(fixture_sweep: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    plot = tmp_path / "curves.png"
    res = runner.invoke(app, ["report", str(fixture_sweep), "--plot", str(plot)],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "ICL final" in res.output and "p_bursty" in res.output
    assert "0.9" in res.output and "0.950" in res.output  # the ceiling note
    img = np.asarray(Image.open(plot).convert("RGB"))
    assert img.shape[0] >= 400 and img.shape[1] >= 1000
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # lines, text, bands: not blank
    assert not list(tmp_path.glob("*.tmp"))
    res = runner.invoke(app, ["report", str(fixture_sweep), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)["rows"]) == 2
    res = runner.invoke(app, ["report", str(fixture_sweep), "--csv"])
    assert res.exit_code == 0 and res.output.startswith("source,label,sequences.p_bursty,")
    res = runner.invoke(app, ["report", str(fixture_sweep), "--closed", "--json"])
    assert res.exit_code == 0


def test_runs_and_sweeps_mixed(fixture_sweep: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "lone", base_cfg(), icl_curve(0.5, 0), iwl_curve(0.5, 0))
    rows, keys = report.collect([fixture_sweep, run])
    assert [r.label for r in rows][-1] == "lone" and len(rows) == 3
    headers, cells, _ = report.table(rows, keys)
    assert headers[:3] == ["sweep", "run", "p_bursty"]
    assert cells[-1][:3] == ["", "lone", "0.9"]  # filled from the run's config


def test_seeds_from_other_folders_join_their_point(fixture_sweep: Path, tmp_path: Path) -> None:
    later = tmp_path / "later"
    later.mkdir()
    seed2 = write_sweep(later, """
        [grid]
        "sequences.p_bursty" = [0.9, 0.0]
        """, seeds="[2]").rename(later / "seed2")
    seed2 = later / "seed2"
    point = json.loads((fixture_sweep / "manifest.json").read_text())["runs"][0]["run_dir"]
    cfg = C.load(fixture_sweep / point / "config.toml")  # p_bursty 0, seed 0
    lone = make_run(tmp_path / "lone_seed3", cfg.replace(run=dataclasses.replace(cfg.run, seed=3)),
                    icl_curve(0.0, 3), iwl_curve(0.0, 3))
    repeat = make_run(tmp_path / "repeat_seed0", cfg, icl_curve(0.0, 0), iwl_curve(0.0, 0))
    rows, keys = report.collect([fixture_sweep, seed2, lone, repeat])
    assert keys == ["sequences.p_bursty"]
    assert [(r.label, len(r.runs), r.expected_runs) for r in rows] == [
        ("p_bursty=0.0", 4, 4), ("p_bursty=0.9", 3, 3), ("repeat_seed0", 1, 1)]
    assert [r.source for r in rows] == ["sweep_out + seed2", "sweep_out + seed2", ""]
    for row, pb, seeds in ((rows[0], 0.0, (0, 1, 2, 3)), (rows[1], 0.9, (0, 1, 2))):
        st = row.stat("ICL", "accuracy_query", "final")
        finals = [icl_curve(pb, s)[-1] for s in seeds]
        assert st.mean == pytest.approx(statistics.fmean(finals))
        assert st.std == pytest.approx(statistics.stdev(finals))
        assert sorted(r.config.run.seed for r in row.runs) == list(seeds)
    headers, cells, _ = report.table(rows, keys)
    assert [c[headers.index("n")] for c in cells] == ["4/4", "3/3", "1"]
    # A run at a seed its point already has is a repeat to compare: its own row.
    assert rows[2].runs[0].path == repeat
    # The heading names the sweeps, and only the runs that kept a row of their own.
    assert report.title([fixture_sweep, seed2, lone, repeat], rows) == "fixture; repeat_seed0"
    assert report.title([fixture_sweep, lone]) == "fixture; lone_seed3"
    # A run given again, alone or inside its sweep, counts once.
    again, _ = report.collect([fixture_sweep, seed2, lone, repeat, lone,
                               fixture_sweep / point, fixture_sweep])
    assert [len(r.runs) for r in again] == [4, 3, 1]
    apart, _ = report.collect([fixture_sweep, seed2, lone, repeat], pool=False)
    assert [len(r.runs) for r in apart] == [2, 2, 1, 1, 1, 1]
    res = CliRunner().invoke(app, ["report", str(fixture_sweep), str(lone), "--json"])
    assert res.exit_code == 0, res.output
    assert [len(r["runs"]) for r in json.loads(res.output)["rows"]] == [3, 2]
    res = CliRunner().invoke(app, ["report", str(fixture_sweep), str(lone), "--json",
                                   "--separate"])
    assert [len(r["runs"]) for r in json.loads(res.output)["rows"]] == [2, 2, 1]


def test_a_key_the_sweep_holds_fixed_gets_a_column_beside_a_run_that_differs(
        fixture_sweep: Path, tmp_path: Path) -> None:
    from eicl_cli.plots import _label
    point = json.loads((fixture_sweep / "manifest.json").read_text())["runs"][0]["run_dir"]
    cfg = C.load(fixture_sweep / point / "config.toml")
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, exemplars="single"),
                      sequences=dataclasses.replace(cfg.sequences, p_bursty=0.9))
    lone = make_run(tmp_path / "identical", cfg, icl_curve(0.9, 0), iwl_curve(0.9, 0))
    rows, keys = report.collect([fixture_sweep, lone])
    assert keys == ["sequences.p_bursty", "data.exemplars"]
    headers, cells, _ = report.table(rows, keys)
    assert headers[2:4] == ["p_bursty", "exemplars"]
    assert [c[1:4] for c in cells] == [["p_bursty=0.0", "0.0", "all"], ["p_bursty=0.9", "0.9", "all"],
                                       ["identical", "0.9", "single"]]
    assert _label(rows[-1], keys) == "p_bursty=0.9, exemplars=single"


def test_zip_keys_stay_behind_their_labels_but_an_unswept_difference_shows(
        tmp_path: Path) -> None:
    def other_shots(i: int, cfg: C.Config) -> C.Config:  # trained otherwise than its sweep says
        return cfg.replace(sequences=dataclasses.replace(cfg.sequences, bursty_shots=4)) \
            if i == 0 else cfg
    out = write_sweep(tmp_path, """
        [zip]
        label = ["plain", "zipf"]
        "sequences.p_bursty" = [0.9, 0.5]
        "classes.zipf_exponent" = [0.0, 1.0]
        """, seeds="[0]", edit=other_shots)
    rows, keys = report.collect([out])
    assert keys == ["label", "sequences.bursty_shots"]
    # A lone run beside the labels is named by its folder and what sets it apart.
    from eicl_cli.plots import _label
    plain = C.load(out / rows[0].runs[0].path.name / "config.toml")
    lone = make_run(tmp_path / "mine", plain.replace(
        run=dataclasses.replace(plain.run, seed=5), sequences=dataclasses.replace(
            plain.sequences, bursty_shots=2)), icl_curve(0.9, 5), iwl_curve(0.9, 5))
    rows, keys = report.collect([out, lone])
    assert [_label(r, keys) for r in rows] == ["plain", "zipf", "mine, bursty_shots=2"]
    # In the table the run's name goes in the labels' column, not a second one.
    headers, cells, _ = report.table(rows, keys)
    assert headers[:3] == ["sweep", "label", "bursty_shots"]
    assert [c[:3] for c in cells] == [["sweep_out", "plain", "4"], ["sweep_out", "zipf", "3"],
                                      ["", "mine", "2"]]


def test_sections_a_model_does_not_use_are_no_difference(tmp_path: Path) -> None:
    transformer = base_cfg(rnn={"num_layers": 12})
    lstm2 = base_cfg(model={"kind": "lstm"}, rnn={"num_layers": 2})
    lstm3 = base_cfg(model={"kind": "lstm"}, rnn={"num_layers": 3})
    made = [make_run(tmp_path / name, cfg, icl_curve(0.5, 0), iwl_curve(0.5, 0))
            for name, cfg in [("t", transformer), ("l2", lstm2), ("l3", lstm3)]]
    _, keys = report.collect(made[:2])
    assert keys == ["model.kind"]  # the transformer's inherited rnn.num_layers is no difference
    rows, keys = report.collect(made)
    assert keys == ["model.kind", "rnn.num_layers"]
    headers, cells, _ = report.table(rows, keys)
    assert [c[0:3] for c in cells] == [["t", "transformer", ""], ["l2", "lstm", "2"],
                                       ["l3", "lstm", "3"]]


def test_a_compile_only_key_is_no_difference(tmp_path: Path) -> None:
    looped = base_cfg()
    unrolled = base_cfg(transformer={"unroll": 12}, embedding={"conv_impl": "gemm"},
                        train={"steps_per_call": 4})
    wider = base_cfg(transformer={"unroll": 12, "num_heads": 4})
    made = [make_run(tmp_path / name, cfg, icl_curve(0.5, 0), iwl_curve(0.5, 0))
            for name, cfg in [("a", looped), ("b", unrolled), ("c", wider)]]
    assert report.collect(made[:2])[1] == []  # same model, same results
    assert report.collect(made)[1] == ["transformer.num_heads"]


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}/nothing"], "does not exist"),
    (["report", "{tmp}"], "is not a run folder (no config.toml), a sweep folder"),
    (["report", "{run}", "--plot", "{tmp}/x.jpg"], "give a file name ending in .png"),
    (["report", "{run}", "--json", "--csv"], "choose one"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    run = make_run(tmp_path / "r", base_cfg(), icl_curve(0.5, 0), iwl_curve(0.5, 0))
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output


def test_plot_needs_evaluations(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    runs.write_config(run, base_cfg())
    rows, keys = report.collect([run])
    assert rows[0].notes == ["0/1 runs finished"]
    with pytest.raises(EiclError, match="nothing to plot"):
        from eicl_cli import plots
        plots.plot_curves(rows, keys, tmp_path / "p.png")


@pytest.mark.parametrize("cut", ["[optimizer]", "keep_checkpoints ="])
def test_a_run_whose_config_is_cut_short_is_left_out_not_shown_as_fresh(
        fixture_sweep: Path, tmp_path: Path, cut: str) -> None:
    # Cut at a line boundary, as a crash or a full disk leaves it: read with
    # defaults, it would be a run of 500,000 steps at the paper's settings.
    damaged = next(p for p in sorted(fixture_sweep.iterdir()) if runs.is_run_dir(p))
    text = (damaged / "config.toml").read_text()
    (damaged / "config.toml").write_text(text[:text.index(cut)])
    res = CliRunner().invoke(app, ["report", str(fixture_sweep), "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr.strip() == (f"warning: left out {damaged}: {damaged / 'config.toml'} is "
                                  "damaged: it differs from what eicl wrote (its checksum does "
                                  "not match: cut short or edited by hand); restore it, or start "
                                  "the run again in a new folder (a resume takes new settings "
                                  "from --set, not from an edited file)")
    rows = json.loads(res.stdout)["rows"]
    row = next(r for r in rows if str(damaged) not in r["runs"] and len(r["runs"]) == 1)
    assert row["expected_runs"] == 2 and "1 damaged, left out" in row["notes"]
    assert all(r["steps"] == STEPS[-1] for r in rows)
    # Given alone, it is an error of one line.
    res = CliRunner().invoke(app, ["report", str(damaged)])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: {damaged / 'config.toml'} is damaged")


def test_a_config_from_before_checksums_is_read_unless_a_section_is_missing(
        tmp_path: Path) -> None:
    run = make_run(tmp_path / "old", base_cfg(), icl_curve(0.5, 0), iwl_curve(0.5, 0))
    body = C.to_toml(base_cfg())
    (run / "config.toml").write_text(body)  # as eicl wrote it before the checksum line
    assert report.collect([run])[0][0].runs[0].config == base_cfg()
    (run / "config.toml").write_text(body[:body.index("[rnn]")])
    with pytest.raises(EiclError, match=r"config.toml is damaged: it has no \[rnn\] section"):
        report.collect([run])


# ---------------------------------------------------------------- --best-by / --per

# Final train loss (per seed), ICL and IWL of each point of a tuning sweep:
# (model.kind, optimizer.max_lr, optimizer.warmup_steps) -> values. Each
# criterion picks another point, so a test sees which one decided.
TUNING = {
    ("transformer", 1e-4, 0): {"loss": (1.0, 1.0), "icl": 0.5, "iwl": 0.7},
    ("transformer", 1e-4, 500): {"loss": (0.9, 0.9), "icl": 0.8, "iwl": 0.3},
    # The lowest loss of any one transformer run (seed 0), but the highest mean.
    ("transformer", 1e-3, 0): {"loss": (0.3, 1.9), "icl": 0.4, "iwl": 0.2},
    ("transformer", 1e-3, 500): {"loss": (0.5, 0.5), "icl": 0.6, "iwl": 0.4},
    ("lstm", 1e-4, 0): {"loss": (0.6, 0.6), "icl": 0.1, "iwl": 0.5},
    # No train records: the lowest loss if a missing value counted as any number.
    ("lstm", 1e-4, 500): {"loss": (), "icl": 0.05, "iwl": 0.6},
    ("lstm", 1e-3, 0): {"loss": (0.8, 0.8), "icl": 0.2, "iwl": 0.1},
    # Seed 1 stops at step 3000 (unfinished): still a candidate.
    ("lstm", 1e-3, 500): {"loss": (0.9, 0.9), "icl": 0.15, "iwl": 0.2},
}
UNFINISHED = ("lstm", 1e-3, 500, 1)


def tuning_metrics(run: sweep.SweepRun) -> dict:
    v = run.values
    point = (v["model.kind"], v["optimizer.max_lr"], v["optimizer.warmup_steps"])
    t = TUNING[point]
    rising = (0.2, 0.4, 0.6, 0.8, 1.0)
    steps = STEPS[:3] if (*point, run.seed) == UNFINISHED else STEPS
    loss = [t["loss"][run.seed] + 0.2 * (4 - i) for i in range(5)] if t["loss"] else []
    return {"icl": [t["icl"] * f for f in rising], "iwl": [t["iwl"] * f for f in rising],
            "loss": loss[:len(steps)], "steps": steps}


@pytest.fixture
def tuning_sweep(tmp_path: Path) -> Path:
    """model.kind x max_lr x warmup_steps, 2 seeds, metrics from TUNING."""
    return write_sweep(tmp_path, """
        [grid]
        "model.kind" = ["transformer", "lstm"]
        "optimizer.max_lr" = [1e-4, 1e-3]
        "optimizer.warmup_steps" = [0, 500]
        """, metrics=tuning_metrics)


def chosen(best: report.Best) -> list[tuple]:
    return [(c.group, c.row.values["optimizer.max_lr"], c.row.values["optimizer.warmup_steps"])
            for c in best.choices]


@pytest.mark.parametrize("name, expected", [
    # Lower is better, the mean over seeds: not (1e-3, 0), whose seed 0 is lowest.
    ("train_loss", [("transformer", 1e-3, 500), ("lstm", 1e-4, 0)]),
    ("icl", [("transformer", 1e-4, 500), ("lstm", 1e-3, 0)]),
    ("icl_closed", [("transformer", 1e-4, 500), ("lstm", 1e-3, 0)]),
    ("icl_loss", [("transformer", 1e-4, 500), ("lstm", 1e-3, 0)]),
    ("iwl", [("transformer", 1e-4, 0), ("lstm", 1e-4, 500)]),
    ("iwl_loss", [("transformer", 1e-4, 0), ("lstm", 1e-4, 500)]),
])
def test_best_by_keeps_the_best_point_per_group(tuning_sweep: Path, name: str,
                                                expected: list[tuple]) -> None:
    rows, keys = report.collect([tuning_sweep])
    best = report.choose_best(rows, keys, name, per="model.kind")
    assert chosen(best) == expected
    assert best.keys[0] == "model.kind" and sorted(best.keys) == sorted(keys)
    assert [c.points for c in best.choices] == [4, 4]


def test_best_by_train_loss_values_candidates_and_unfinished(tuning_sweep: Path) -> None:
    rows, keys = report.collect([tuning_sweep])
    best = report.choose_best(rows, keys, "train_loss", per="model.kind")
    transformer, lstm = best.choices
    assert transformer.value.mean == pytest.approx(0.5) and transformer.value.steps == [5000] * 2
    assert lstm.value.mean == pytest.approx(0.6)
    # The lstm point without train records is no candidate; the unfinished run is one.
    assert (transformer.candidates, transformer.unfinished) == (4, 0)
    assert (lstm.candidates, lstm.unfinished) == (3, 1)
    note = best.note()
    assert note.startswith("One row per model.kind: the point with the lowest train_loss")
    assert "transformer among 4 points; lstm among 3 of 4 points" in note
    assert "1 of the candidates' runs unfinished" in note
    # Without --per: one group, the best point overall.
    overall = report.choose_best(rows, keys, "train_loss")
    assert chosen(overall) == [(None, 1e-3, 500)] and overall.keys == keys
    assert overall.choices[0].candidates == 7 and overall.choices[0].points == 8
    assert "chosen among 7 of 8 points" in overall.note()
    assert chosen(report.choose_best(rows, keys, "icl")) == [(None, 1e-4, 500)]


def test_train_loss_is_the_mean_over_the_last_tenth_of_logged_steps(tmp_path: Path) -> None:
    """One record's loss is one log interval's: a run whose last record
    dips below another's steady loss is not the better for it."""
    steps = list(range(100, 5001, 100))
    dips = make_run(tmp_path / "dips", base_cfg(optimizer={"max_lr": 1e-3}), [0.5] * 50,
                    [0.5] * 50, steps=steps, loss=[1.0] * 49 + [0.1])
    steady = make_run(tmp_path / "steady", base_cfg(optimizer={"max_lr": 1e-4}), [0.5] * 50,
                      [0.5] * 50, steps=steps, loss=[2.0] * 44 + [0.5] * 6)
    rows, keys = report.collect([dips, steady])
    # Steps 4500..5000: six records, five at 1.0 and the last at 0.1.
    assert rows[0].stat("train", "loss", "tail").mean == pytest.approx((5 * 1.0 + 0.1) / 6)
    assert rows[1].stat("train", "loss", "tail").mean == pytest.approx(0.5)
    assert [c.row.label for c in report.choose_best(rows, keys, "train_loss").choices] == [
        "steady"]
    # A group none of whose points has logged a training loss keeps no row, and says so.
    fresh = make_run(tmp_path / "fresh", base_cfg(optimizer={"max_lr": 3e-3}), [0.5] * 50,
                     [0.5] * 50, steps=steps, loss=[])
    rows, keys = report.collect([dips, steady, fresh])
    best = report.choose_best(rows, keys, "train_loss", per="optimizer.max_lr")
    assert [(c.group, c.row.label) for c in best.choices] == [(1e-3, "dips"), (1e-4, "steady")]
    assert best.without_value == [3e-3]
    assert best.note().endswith("; no point has a value in optimizer.max_lr = 0.003.")


def test_best_by_json_csv_and_table(tuning_sweep: Path) -> None:
    runner = CliRunner()
    args = ["report", str(tuning_sweep), "--best-by", "train_loss", "--per", "model.kind"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["best_by"] == {"metric": "train_loss", "lower_is_better": True,
                               "rule": report.BEST_BY["train_loss"].text, "per": "model.kind",
                               "groups_without_value": []}
    assert data["swept_keys"][0] == "model.kind"
    assert [(r["values"]["model.kind"], r["values"]["optimizer.max_lr"],
             r["values"]["optimizer.warmup_steps"]) for r in data["rows"]] == [
        ("transformer", 1e-3, 500), ("lstm", 1e-4, 0)]
    choice = data["rows"][1]["choice"]
    assert choice["group"] == "lstm" and choice["value"]["mean"] == pytest.approx(0.6)
    assert (choice["candidates"], choice["points"], choice["unfinished_runs"]) == (3, 4, 1)
    res = runner.invoke(app, [*args, "--csv"])
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [(r["model.kind"], r["best_by"], float(r["best_by_mean"]), r["candidates"])
            for r in table] == [("transformer", "train_loss", pytest.approx(0.5), "4"),
                                ("lstm", "train_loss", pytest.approx(0.6), "3")]
    res = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "best by train_loss per model.kind" in res.output
    assert "lstm among 3 of 4 points" in " ".join(res.output.split())
    rows, keys = report.collect([tuning_sweep])
    best = report.choose_best(rows, keys, "train_loss", per="model.kind")
    headers, cells, notes = report.table(best.rows, best.keys, best=best)
    assert headers[:4] == ["kind", "max_lr", "warmup_steps", "train_loss"]
    assert [c[:4] for c in cells] == [["transformer", "0.001", "500", "0.500 ±0.000"],
                                      ["lstm", "0.0001", "0", "0.600 ±0.000"]]
    assert notes[0] == best.note()


def test_best_by_plot_draws_only_the_chosen_points(tuning_sweep: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from eicl_cli import plots
    png = tmp_path / "tuned.png"
    args = ["report", str(tuning_sweep), "--best-by", "icl", "--per", "model.kind",
            "--plot", str(png)]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] >= 400 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    drawn = []
    monkeypatch.setattr(plots, "plot_curves", lambda rows, keys, path, **kw: drawn.append(
        ([plots._label(r, keys) for r in rows], kw["title"])))
    assert CliRunner().invoke(app, args).exit_code == 0
    assert drawn == [(["kind=transformer, max_lr=0.0001, warmup_steps=500",
                       "kind=lstm, max_lr=0.001, warmup_steps=0"],
                      "fixture: best by icl per model.kind")]


def test_per_a_key_every_point_shares_is_one_group(tuning_sweep: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tuning_sweep), "--best-by", "train_loss",
                                   "--per", "data.exemplars", "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr.strip() == ("warning: --per data.exemplars: every point has "
                                  "data.exemplars = all; one group")
    rows = json.loads(res.stdout)["rows"]
    assert [(r["choice"]["group"], r["values"]["model.kind"], r["choice"]["candidates"])
            for r in rows] == [("all", "transformer", 7)]


@pytest.mark.parametrize("extra, message", [
    (["--best-by", "loss"], "error: --best-by 'loss' is not allowed; choose one of: "
     "train_loss, icl, icl_closed, iwl, icl_loss, iwl_loss"),
    (["--best-by", "icl", "--per", "model.kin"],
     "error: --per: 'model.kin' is not a config key; did you mean 'model.kind'?"),
    (["--best-by", "icl", "--per", "run.seed"], "error: --per run.seed: one row pools runs "
     "that differ in run.seed"),
    (["--per", "model.kind"], "error: --per model.kind needs --best-by METRIC"),
    (["--best-by", "icl", "--tensorboard", "{tmp}/tb"], "error: --best-by chooses rows"),
])
def test_best_by_bad_input_is_one_line_exit_2(tuning_sweep: Path, tmp_path: Path,
                                              extra: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["report", str(tuning_sweep),
                                   *[a.format(tmp=tmp_path) for a in extra]])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(message), res.output
    assert not (tmp_path / "tb").exists()


def test_best_by_with_no_value_anywhere_is_an_error(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    runs.write_config(run, base_cfg())
    res = CliRunner().invoke(app, ["report", str(run), "--best-by", "train_loss"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and lines == [
        "error: --best-by train_loss: no point has a value yet (each run's training loss "
        "averaged over its last 10% of logged steps)"], res.output
