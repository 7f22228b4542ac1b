"""Trackers show metrics.jsonl: what they logged, read back with their own
readers, is metrics.jsonl value for value, across a resume too."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from eicl_cli import runs, tracking
from eicl_cli.cli import app
from eicl_cli.config import ConfigError
from eicl_cli.errors import EiclError
from eicl_cli.eval_modes import ICL_MODE, iwl_mode

from train_support import TINY, eicl, tiny, train_run

pytest.importorskip("tensorboard")


def read_tensorboard(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """{tag: [(step, value)]} and the config texts, as TensorBoard reads them
    (purges included)."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config")]
    return scalars, texts


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tags, in float32 as TensorBoard keeps scalars."""
    cfg = runs.read_config(run)
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in runs.read_metrics(run):
        for tag, v in tracking.scalar_names(rec, iwl_mode(cfg.eval.modes)).items():
            out.setdefault(tag, []).append((rec["step"], float(np.float32(v))))
    return out


def test_scalar_names():
    train = {"kind": "train", "step": 5, "mode": "bursty", "time": 1.5, "steps_per_s": 9.0,
             "lr": 0.001, "loss": 2.0, "accuracy_query": 0.5, "from_support": None}
    assert tracking.scalar_names(train) == {
        "train/time": 1.5, "train/steps_per_s": 9.0, "train/lr": 0.001, "train/loss": 2.0,
        "train/accuracy_query": 0.5}
    ev = {"kind": "eval", "step": 5, "mode": ICL_MODE, "accuracy_query": 0.25,
          "accuracy_closed": 0.5}
    assert tracking.scalar_names(ev) == {"icl/accuracy_query": 0.25, "icl/accuracy_closed": 0.5}
    iwl = {**ev, "mode": "no_support_zipfian"}
    assert tracking.scalar_names(iwl, "no_support_zipfian")["iwl/accuracy_query"] == 0.25
    assert tracking.scalar_names(iwl, "no_support_common") == {
        "eval/no_support_zipfian/accuracy_query": 0.25,
        "eval/no_support_zipfian/accuracy_closed": 0.5}


def test_tensorboard_matches_metrics_across_a_resume(data_dir: Path, tmp_path: Path):
    cfg = tiny(data_dir, 'run.trackers=["tensorboard"]', "run.steps=20", "run.log_every=5",
               "run.eval_every=10", "run.checkpoint_every=10", "eval.train_sequences=32",
               "eval.batch_size=32")
    run = tmp_path / "run"
    train_run(cfg, run)
    first, _ = read_tensorboard(run / tracking.TB_DIR)
    assert first == expected(run)
    # Resume from step 10, as if the run had stopped after logging steps 15
    # and 20: TensorBoard must drop those and hold the rerun's values once.
    runs.checkpoint_path(run, 20).unlink()
    assert train_run(cfg, run, resume=True).step == 20
    assert len(list((run / tracking.TB_DIR).glob("events.out.tfevents.*"))) == 2
    scalars, texts = read_tensorboard(run / tracking.TB_DIR)
    want = expected(run)
    assert scalars == want
    assert [s for s, _ in want["train/loss"]] == [5, 10, 15, 20]
    assert [s for s, _ in want["icl/accuracy_closed"]] == [10, 20]
    assert {"train/lr", "train/steps_per_s", "train/from_support", "icl/accuracy_query",
            "iwl/accuracy_query"} <= set(scalars)
    assert len(texts) == 2 and "[run]" in texts[0]

    # The same run exported by `eicl report --tensorboard`, twice: the second
    # export supersedes the first rather than doubling it.
    out = tmp_path / "tb"
    for _ in range(2):
        res = CliRunner().invoke(app, ["report", str(run), "--tensorboard", str(out)])
        assert res.exit_code == 0, res.output
    assert read_tensorboard(out / "run")[0] == want


def test_unknown_tracker_is_refused(data_dir: Path):
    with pytest.raises(ConfigError) as e:
        tiny(data_dir, 'run.trackers=["mlflow"]')
    assert "run.trackers entry = 'mlflow' is not allowed" in str(e.value)
    assert "tensorboard, wandb" in str(e.value)


def test_missing_extra_names_the_install_command(data_dir: Path, tmp_path: Path,
                                                 monkeypatch):
    cfg = tiny(data_dir, 'run.trackers=["tensorboard"]')
    # As if the extra were not installed, though other tests imported it.
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(EiclError) as e:
        tracking.open_trackers(cfg, tmp_path, 0)
    msg = str(e.value)
    assert "pip install 'eicl[tensorboard]'" in msg and "\n" not in msg
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(EiclError) as e:
        tracking.check_installed([cfg])
    assert "pip install 'eicl[tensorboard]'" in str(e.value)


def wandb_files(run: Path) -> list[Path]:
    """A run folder's offline W&B run files, one per start, oldest first."""
    return sorted((run / tracking.WANDB_DIR).glob("offline-run-*/run-*.wandb"))


def read_wandb_history(path: Path) -> list[dict]:
    """The history rows of one offline W&B run file: W&B's own record
    protobufs, read from its log-structured .wandb file (leveldb log blocks
    after a 7-byte ":W&B" header; wandb no longer ships a Python reader)."""
    import json
    import struct
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows


def wandb_rows(path: Path) -> list[dict]:
    """A finished start's history rows (W&B's service may still be writing
    the file as finish() returns)."""
    deadline = time.time() + 20
    while not (rows := read_wandb_history(path)) and time.time() < deadline:
        time.sleep(0.2)
    return rows


def as_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if not k.startswith("_"):
                out.setdefault(k, []).append((row["_step"], v))
    return out


def metrics_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    cfg = runs.read_config(run)
    want: dict[str, list[tuple[int, float]]] = {}
    for rec in runs.read_metrics(run):
        for tag, v in tracking.scalar_names(rec, iwl_mode(cfg.eval.modes)).items():
            want.setdefault(tag, []).append((rec["step"], v))
    return want


# What a rerun of the same steps changes: how long they took.
TIMING = ("time", "steps_per_s", "sequences_per_s")


def without_timing(series: dict) -> dict:
    return {k: v for k, v in series.items() if k.rsplit("/", 1)[-1] not in TIMING}


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_matches_metrics_across_a_resume(data_dir: Path, tmp_path: Path,
                                                      wandb_offline):
    cfg = tiny(data_dir, 'run.trackers=["wandb"]', "run.steps=20", "run.log_every=5",
               "run.eval_every=10", "run.checkpoint_every=10", "eval.train_sequences=32",
               "eval.batch_size=32")
    run = tmp_path / "run"
    train_run(cfg, run)
    run_id = (run / tracking.WANDB_ID_FILE).read_text().strip()
    (first,) = wandb_files(run)
    assert first.name == f"run-{run_id}.wandb"
    assert as_series(wandb_rows(first)) == metrics_series(run)

    # Resumed from step 10 after steps 15 and 20 were logged: the same W&B
    # run continues (its id kept in the run folder), and its history, merged
    # as W&B merges a resumed run's (a step at or below the last one it holds
    # is dropped), holds each step once: the first start's values, which the
    # bit-exact rerun repeats but for its timings.
    runs.checkpoint_path(run, 20).unlink()
    assert train_run(cfg, run, resume=True).step == 20
    assert (run / tracking.WANDB_ID_FILE).read_text().strip() == run_id
    files = wandb_files(run)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    merged, last = [], -1
    for path in files:
        for row in wandb_rows(path):
            if row["_step"] > last:
                merged.append(row)
        last = max(r["_step"] for r in merged)
    resumed = as_series(wandb_rows(files[1]))
    assert {s for series in resumed.values() for s, _ in series} == {15, 20}
    assert without_timing(as_series(merged)) == without_timing(metrics_series(run))
    assert without_timing(resumed) == {
        k: [(s, v) for s, v in series if s > 10]
        for k, series in without_timing(metrics_series(run)).items()
        if any(s > 10 for s, _ in series)}


def test_an_unreachable_wandb_costs_a_warning_not_the_run(data_dir: Path, tmp_path: Path):
    """A fresh process, as W&B reads its settings once per process."""
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing there
           "WANDB_API_KEY": "a" * 40, "WANDB_INIT_TIMEOUT": "3", "WANDB_SILENT": "true"}
    done = eicl("train", "--config", str(TINY), "--out", str(run),
                "--set", 'run.trackers=["wandb", "tensorboard"]', "--set", "run.steps=10",
                "--set", "run.log_every=5", "--set", "run.eval_every=10",
                "--set", "eval.train_sequences=32", "--set", "eval.batch_size=32",
                data_dir=data_dir, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("Weights & Biases failed") == 1, done.stderr[-2000:]
    assert [r["step"] for r in runs.read_metrics(run, kind="train")] == [5, 10]
    assert read_tensorboard(run / tracking.TB_DIR)[0] == expected(run)


def test_a_sweep_run_is_grouped_by_its_sweep_file_and_named_by_its_point(tmp_path: Path):
    sweep = tmp_path / "out"
    point = sweep / "p_bursty=0.9__seed=1"
    point.mkdir(parents=True)
    from eicl_cli.sweep.manifest import MANIFEST, MANIFEST_FORMAT
    (sweep / MANIFEST).write_text(json.dumps(
        {"format": MANIFEST_FORMAT, "sweep_file": "/somewhere/burstiness.toml", "runs": []}))
    assert tracking.sweep_labels(point) == ("burstiness", "p_bursty=0.9__seed=1")
    alone = tmp_path / "run"
    alone.mkdir()
    assert tracking.sweep_labels(alone) == (None, "run")


def test_stacked_runs_each_get_their_own_tensorboard_view(data_dir: Path, tmp_path: Path):
    from eicl_cli import training
    from train_support import new_run_dirs
    cfgs = [training.resolved_config(tiny(
        data_dir, 'run.trackers=["tensorboard"]', f"run.seed={seed}", "run.steps=10",
        "run.log_every=5", "run.eval_every=10", "eval.train_sequences=32",
        "eval.batch_size=32")) for seed in (0, 1)]
    dirs = new_run_dirs(cfgs, tmp_path, "stacked")
    assert training.train_runs(cfgs, dirs, live=False).step == 10
    views = [read_tensorboard(d / tracking.TB_DIR)[0] for d in dirs]
    assert views[0] == expected(dirs[0]) and views[1] == expected(dirs[1])
    assert views[0]["train/loss"] != views[1]["train/loss"]  # two runs, not one twice
