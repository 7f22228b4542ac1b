"""Batch workers (train.draw_workers): stacked runs' batches drawn in worker
processes are the batches the runs draw in-process, and training with them
is training without them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from eicl_cli import runs, sweep
from eicl_cli import training
from eicl_cli.data.batch_workers import BatchWorkers, worker_count
from eicl_cli.data.dataset import load_dataset
from eicl_cli.data.sequences import SequenceGenerator, train_fields
from eicl_cli.errors import EiclError
from train_support import (interrupt_when, new_run_dirs, sweep_process, tensors, tiny,
                           tiny_sweep_file)

POINTS = [("sequences.p_bursty=0.0", "run.seed=0"), ("sequences.p_bursty=1.0", "run.seed=1"),
          ("classes.zipf_exponent=1.0", "run.seed=2")]


def test_worker_count_rules():
    assert worker_count(-1, 8, "gpu", cpus=16) == 8
    assert worker_count(-1, 8, "gpu", cpus=6) == 5  # the training process keeps a core
    assert worker_count(-1, 8, "gpu", cpus=2) == 0  # one worker would not share the work
    assert worker_count(-1, 8, "cpu", cpus=16) == 0  # the CPU's cores run the step
    assert worker_count(-1, 1, "gpu", cpus=16) == 0  # a single run draws its own
    assert worker_count(3, 8, "cpu") == 3 and worker_count(12, 8, "cpu") == 8
    assert worker_count(0, 8, "gpu", cpus=16) == 0


def test_draw_workers_below_minus_one_is_refused(data_dir: Path):
    with pytest.raises(EiclError, match=r"train.draw_workers = -2 must be >= 0, or -1"):
        tiny(data_dir, "train.draw_workers=-2")


def test_workers_draw_the_batches_the_runs_draw_themselves(data_dir: Path):
    cfgs = [tiny(data_dir, *p) for p in POINTS]
    dataset = load_dataset(cfgs[0])
    gens = [SequenceGenerator(dataset, cfg) for cfg in cfgs]
    with BatchWorkers(dataset, cfgs, 2) as workers:
        # In order (each call the one guessed ahead), then a jump, then a
        # different call size: every answer must be the in-process one.
        for step, n in [(0, 3), (3, 3), (6, 3), (40, 3), (43, 1), (44, 1), (7, 2)]:
            got = workers.fields(step, n)
            assert len(got) == len(cfgs)
            for g, fields in zip(gens, got):
                want = train_fields(g, step, n)
                assert fields.keys() == want.keys()
                for name in want:
                    np.testing.assert_array_equal(fields[name], want[name], err_msg=name)
        # The runs really draw different streams.
        first = workers.fields(0, 1)
        assert not np.array_equal(first[0]["image_index"], first[1]["image_index"])


def test_workers_ignore_ctrl_c_and_stop_on_close(data_dir: Path):
    cfgs = [tiny(data_dir, *p) for p in POINTS[:2]]
    dataset = load_dataset(cfgs[0])
    workers = BatchWorkers(dataset, cfgs, 2)
    workers.fields(0, 1)
    procs = list(workers._procs)
    assert len(procs) == 2
    for p in procs:  # Ctrl-C reaches the whole process group
        os.kill(p.pid, signal.SIGINT)
    want = train_fields(SequenceGenerator(dataset, cfgs[1]), 5, 2)
    np.testing.assert_array_equal(workers.fields(5, 2)[1]["label"], want["label"])
    workers.close()
    assert [p.poll() for p in procs] == [0, 0]


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(data_dir: Path):
    cfgs = [tiny(data_dir, *p) for p in POINTS]
    dataset = load_dataset(cfgs[0])
    with BatchWorkers(dataset, cfgs, 2) as workers:
        workers.fields(0, 1)
        workers._procs[1].kill()
        workers._procs[1].wait()
        with pytest.raises(EiclError, match=r"batch worker 1 stopped \(exit code -9;.*\); "
                                            r"train.draw_workers = 0 draws"):
            workers.fields(1, 1)


def test_stacked_training_with_workers_equals_training_without(data_dir: Path, tmp_path: Path):
    sgd = ["optimizer.name=\"sgd\"", "optimizer.max_lr=0.05", "optimizer.warmup_steps=0"]
    ends = {}
    for n_workers in (0, 2):
        cfgs = [training.resolved_config(tiny(
            data_dir, *p, *sgd, "run.steps=10", "run.log_every=5", "run.eval_every=10",
            "run.checkpoint_every=10", "train.steps_per_call=2",
            f"train.draw_workers={n_workers}")) for p in POINTS]
        dirs = new_run_dirs(cfgs, tmp_path, f"w{n_workers}_")
        assert training.train_runs(cfgs, dirs, live=False).step == 10
        assert [e["draw_workers"] for d in dirs for e in runs.read_environment(d)] == \
            [n_workers] * 3
        strip = {"time", "steps_per_s", "sequences_per_s"}
        ends[n_workers] = [
            ([{k: v for k, v in r.items() if k not in strip} for r in runs.read_metrics(d)],
             tensors(runs.checkpoint_path(d, 10))) for d in dirs]
    for (m0, c0), (m2, c2) in zip(ends[0], ends[2]):
        assert m2 == m0  # the same batches: the same losses and evaluations, exactly
        assert c2.keys() == c0.keys()
        for name in c0:
            np.testing.assert_array_equal(c2[name], c0[name], err_msg=name)


@pytest.mark.slow  # a real stacked sweep process, interrupted, then continued
def test_ctrl_c_on_a_stacked_sweep_with_workers_saves_and_resumes(data_dir: Path,
                                                                 tmp_path: Path):
    steps = 600
    sweep_file = tiny_sweep_file(tmp_path / "s.toml", {
        "run.steps": steps, "run.eval_every": steps, "run.checkpoint_every": 10,
        "train.draw_workers": 2})
    out = tmp_path / "sweep"
    proc = sweep_process(sweep_file, out, data_dir, "--stack", "2")
    names: list[str] = []

    def checkpointed() -> bool:
        if not names and (out / sweep.MANIFEST).exists():
            names.extend(r["name"] for r in sweep.read_manifest(out)["runs"])
        return bool(names) and all((sweep.run_progress(out / n) or 0) >= 10 for n in names)

    # Ctrl+C (the sweep passes it to the stacked process's whole group, its
    # batch workers included) once both runs have a checkpoint.
    text = interrupt_when(proc, checkpointed)
    assert proc.returncode == 130, text
    log = (out / "logs" / f"{names[0]}.log").read_text()
    assert "Traceback" not in log and "batch worker" not in log, log
    reached = [sweep.run_progress(out / n) for n in names]
    assert reached[0] == reached[1] and 10 <= reached[0] < steps
    assert [e["draw_workers"] for e in runs.read_environment(out / names[0])] == [2]

    done = sweep_process(sweep_file, out, data_dir, "--stack", "2")
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output
    for n in names:
        assert sweep.is_finished(out / n, steps)
        logged = [r["step"] for r in runs.read_metrics(out / n, kind="train")]
        assert logged == sorted(set(logged)) and logged[-1] == steps  # none twice


def test_bench_of_a_stack_reports_its_workers_and_stops_them(data_dir: Path, monkeypatch):
    from eicl_cli import bench
    from eicl_cli.data import batch_workers
    started = []
    real = batch_workers.BatchWorkers.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        started.append(list(self._procs))

    monkeypatch.setattr(batch_workers.BatchWorkers, "__init__", spy)
    out = bench.bench_config(tiny(data_dir, "train.draw_workers=2"), steps=2, stack=3,
                             generator_seconds=0.1)
    assert out["draw_workers"] == 2 and out["stack"] == 3
    assert out["draw_sequences_per_s"] > 0
    assert [p.poll() for p in started[0]] == [0, 0]  # closed with the bench
