"""`eicl sweep --launcher slurm`: the [slurm] settings, the dry run, and,
against the real test cluster (tests/slurm_cluster.py), a tiny sweep as one
job array equal to the local launcher's, a preempted task that resumes
bit-exactly, a failed task shown with its error and resubmitted alone, and
two submissions at once of a stacked sweep training each point once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from eicl_cli import runs, sweep
from eicl_cli.cli import app
from eicl_cli.errors import EiclError
from eicl_cli.sweep import slurm, slurm_settings
from slurm_cluster import wait_until
from train_support import TINY, eicl, tensors


def _sweep_file(path: Path, slurm_table: str = "", steps: int = 40) -> Path:
    path.write_text(f'base = "{TINY.as_posix()}"\nseeds = [0, 1]\n[set]\n"run.steps" = {steps}\n'
                    f'[grid]\n"sequences.p_bursty" = [0.0, 0.9]\n{slurm_table}')
    return path


# ---------------------------------------------------------------- no cluster

def test_slurm_table_is_checked(tmp_path: Path) -> None:
    f = _sweep_file(tmp_path / "s.toml", "[slurm]\npartiton = \"gpu\"\n")
    with pytest.raises(EiclError, match="unknown slurm key 'partiton'; did you mean 'partition'"):
        sweep.load_sweep(f)
    f = _sweep_file(tmp_path / "s.toml", "[slurm]\ntime = \"1h\"\n")
    with pytest.raises(EiclError, match=r"time must be a positive integer \(minutes\), got '1h'"):
        sweep.load_sweep(f)
    f = _sweep_file(tmp_path / "s.toml", "[slurm]\nsbatch = [\"exclusive\"]\n")
    with pytest.raises(EiclError, match="must be a long option"):
        sweep.load_sweep(f)


def test_settings_map_to_submitit_parameters(tmp_path: Path) -> None:
    spec = sweep.load_sweep(_sweep_file(tmp_path / "s.toml", (
        '[slurm]\npartition = "gpu"\naccount = "lab"\nqos = "high"\ntime = 240\ngpus = 1\n'
        'cpus = 8\nmem = 32\nconstraint = "a100"\narray_parallelism = 4\n'
        'sbatch = ["--exclusive", "#SBATCH --mail-type=END"]\nsetup = ["module load cuda"]\n')))
    over = slurm_settings.parse_overrides(["partition=debug", "time=30", "setup=['a', 'b']"])
    params = slurm_settings.executor_parameters(slurm_settings.merged(spec.slurm, over))
    assert params == {
        "timeout_min": 30, "nodes": 1, "tasks_per_node": 1, "slurm_partition": "debug",
        "slurm_account": "lab", "slurm_qos": "high", "gpus_per_node": 1, "cpus_per_task": 8,
        "mem_gb": 32, "slurm_constraint": "a100", "slurm_array_parallelism": 4,
        "slurm_additional_parameters": {"exclusive": True, "mail_type": "END"},
        "slurm_setup": ["a", "b"]}
    with pytest.raises(EiclError, match="--slurm: unknown slurm key 'gpu'; did you mean 'gpus'"):
        slurm_settings.parse_overrides(["gpu=1"])
    with pytest.raises(EiclError, match="gpus must be a integer >= 0"):
        slurm_settings.parse_overrides(["gpus=-1"])


def test_sacct_array_ranges_expand() -> None:
    assert slurm.cluster_states([]) == {}
    assert slurm.expand_job_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert slurm.expand_job_ids("12_3") == ["12_3"]


def test_without_submitit_one_line_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)
    res = CliRunner().invoke(app, ["sweep", str(_sweep_file(tmp_path / "s.toml")), "--out",
                                   str(tmp_path / "out"), "--launcher", "slurm"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: --launcher slurm needs submitit: pip install 'eicl[slurm]'"]
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_array_settings_and_gpu_hours(tmp_path: Path) -> None:
    f = _sweep_file(tmp_path / "s.toml", '[slurm]\npartition = "gpu"\ngpus = 2\n', steps=3600)
    res = CliRunner().invoke(app, ["sweep", str(f), "--out", str(tmp_path / "out"), "--launcher",
                                   "slurm", "--dry-run", "--steps-per-s", "1", "--stack", "2",
                                   "--slurm", "time=90"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "a job array of 2 task(s)" in res.output
    assert "train-stack" in res.output and "p_bursty=0.0__seed=0, p_bursty=0.0__seed=1" in res.output
    assert "slurm_partition" in res.output and "timeout_min" in res.output and "90" in res.output
    assert "expected: 2 task-hours, 4 GPU-hours (2 GPU(s) per task)" in res.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- real cluster

def _settled(out: Path) -> list:
    """The statuses once no task is queued or running any more."""
    rows = slurm.task_statuses(out)
    busy = {"pending", "running", "requeued", "submitted"}
    return rows if not any(r.state in busy for r in rows) else []


@pytest.fixture
def cancel_leftovers(slurm_cluster):
    outs: list[Path] = []
    yield outs
    for out in outs:  # a failing test leaves no task holding a core
        if (out / slurm.RECORD).is_file():
            slurm.cancel(out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_array_equals_local_sweep(slurm_cluster, cancel_leftovers, data_dir: Path,
                                  tmp_path: Path) -> None:
    f = _sweep_file(tmp_path / "s.toml", "[slurm]\ntime = 5\ncpus = 1\n")
    out, local = tmp_path / "slurm", tmp_path / "local"
    cancel_leftovers.append(out)
    t0 = time.monotonic()
    res = eicl("sweep", str(f), "--out", str(out), "--launcher", "slurm", data_dir=data_dir)
    assert res.returncode == 0, res.stderr
    assert "submitted job array" in res.stdout + res.stderr
    again = eicl("sweep", str(f), "--out", str(out), "--launcher", "slurm", data_dir=data_dir)
    assert "nothing to submit: 0 run(s) finished, 4 queued or running" in again.stdout + again.stderr
    rows = wait_until("all tasks ended", lambda: _settled(out), 300, every=1.0)
    assert [r.state for r in rows] == ["done"] * 4, [(r.state, r.error) for r in rows]
    assert len({r.job_id.split("_")[0] for r in rows}) == 1  # one array
    print(f"4-task array to done: {time.monotonic() - t0:.1f} s")
    res = eicl("sweep", str(f), "--out", str(local), data_dir=data_dir)
    assert res.returncode == 0, res.stderr
    reports = [json.loads(eicl("report", str(d), "--json", data_dir=data_dir).stdout)["rows"]
               for d in (out, local)]
    for rows_ in reports:  # where each sweep lives differs; every number must not
        for row in rows_:
            del row["source"], row["runs"]
    assert reports[0] == reports[1]
    status = json.loads(eicl("sweep", str(f), "--out", str(out), "--status", "--json",
                             data_dir=data_dir).stdout)
    assert [r["state"] for r in status] == ["done"] * 4 and all(r["steps_per_s"] for r in status)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_preempted_task_resumes_bit_exactly(slurm_cluster, cancel_leftovers, data_dir: Path,
                                            tmp_path: Path) -> None:
    import submitit
    steps = 400
    f = _sweep_file(tmp_path / "s.toml", "[slurm]\ntime = 5\ncpus = 1\n", steps=steps)
    out = tmp_path / "slurm"
    cancel_leftovers.append(out)
    res = eicl("sweep", str(f), "--out", str(out), "--launcher", "slurm", "--set",
               "run.checkpoint_every=10", data_dir=data_dir)
    assert res.returncode == 0, res.stderr
    name = sweep.read_manifest(out)["runs"][0]["name"]
    entry = slurm.read_record(out)[name]
    wait_until("a checkpoint of the first run", lambda: (sweep.run_progress(out / name) or 0) >= 10
          and not sweep.is_finished(out / name, steps), 120, every=0.2)
    job = submitit.SlurmJob(folder=Path(entry["stdout"]).parent, job_id=entry["job_id"])
    job._interrupt()  # submitit's simulated preemption: SIGTERM, then its USR2
    rows = wait_until("all tasks ended", lambda: _settled(out), 400, every=1.0)
    assert [r.state for r in rows] == ["done"] * 4, [(r.state, r.error) for r in rows]
    tries = [l for l in (out / "logs" / f"{name}.log").read_text().splitlines()
             if l.startswith("=== ")]
    assert len(tries) == 2 and "--resume" in tries[1], tries
    ref = tmp_path / "ref"
    res = eicl("train", "--config", str(out / "configs" / f"{name}.toml"), "--set",
               "run.checkpoint_every=10", "--out", str(ref), data_dir=data_dir)
    assert res.returncode == 0, res.stderr
    a = tensors(runs.checkpoint_path(out / name, steps))
    b = tensors(runs.checkpoint_path(ref, steps))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failed_task_shown_and_resubmitted_alone(slurm_cluster, cancel_leftovers,
                                                 data_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    # No Omniglot cache in the test data folder: that point fails when it starts.
    f.write_text(f'base = "{TINY.as_posix()}"\nseeds = [0]\n'
                 '[grid]\n"data.dataset" = ["synthetic", "omniglot"]\n[slurm]\ntime = 5\n')
    out = tmp_path / "slurm"
    cancel_leftovers.append(out)
    res = eicl("sweep", str(f), "--out", str(out), "--launcher", "slurm", data_dir=data_dir)
    assert res.returncode == 0, res.stderr
    rows = wait_until("all tasks ended", lambda: _settled(out), 300, every=1.0)
    good, bad = rows
    assert good.state == "done" and bad.state == "failed", [(r.state, r.error) for r in rows]
    assert bad.error and bad.error.startswith("error:") and bad.log
    shown = eicl("sweep", str(f), "--out", str(out), "--status", data_dir=data_dir,
                 env={"COLUMNS": "250"}).stdout
    assert "failed" in shown and "error: no omniglot cache" in shown
    res = eicl("sweep", str(f), "--out", str(out), "--launcher", "slurm", data_dir=data_dir)
    assert "1 task(s) (1 run(s)); 1 finished" in res.stdout + res.stderr, res.stderr
    assert slurm.read_record(out)[bad.name]["job_id"] != slurm.read_record(out)[good.name]["job_id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_submissions_at_once_train_each_point_once_and_stacks_are_tasks(
        slurm_cluster, cancel_leftovers, data_dir: Path, tmp_path: Path) -> None:
    """Two `eicl sweep --launcher slurm --stack 2` started together: one
    submits (two tasks of two stacked runs each), the other is refused by the
    sweep lock or finds everything queued; every run is trained once."""
    import os
    import subprocess
    f = _sweep_file(tmp_path / "s.toml", "[slurm]\ntime = 5\ncpus = 1\n")
    out = tmp_path / "slurm"
    cancel_leftovers.append(out)
    env = {**os.environ, "EICL_DATA_DIR": str(data_dir)}
    args = [sys.executable, "-m", "eicl_cli", "sweep", str(f), "--out", str(out),
            "--launcher", "slurm", "--stack", "2"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    texts = [p.communicate(timeout=120)[0] for p in procs]
    submitted = [t for t in texts if "submitted job array" in t]
    assert len(submitted) == 1, texts
    assert "2 task(s) (4 run(s))" in submitted[0], submitted
    other = next(t for t in texts if t is not submitted[0])
    assert "in use by" in other or "nothing to submit" in other, other
    rows = wait_until("all tasks ended", lambda: _settled(out), 300, every=1.0)
    assert [r.state for r in rows] == ["done"] * 4, [(r.state, r.error) for r in rows]
    assert len({r.job_id for r in rows}) == 2  # two stacked tasks
    for r in rows:
        log = out / "logs" / f"{r.name}.log"
        logs = [log] if log.is_file() else list((out / "logs").glob("*.log"))
        starts = [l for p in logs for l in p.read_text().splitlines()
                  if l.startswith("=== ") and r.name in l]
        assert len(starts) == 1, (r.name, starts)  # trained once, by one task
