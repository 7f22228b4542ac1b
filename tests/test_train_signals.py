"""Killing and interrupting `eicl train` in real processes: SIGKILL mid-checkpoint,
Ctrl+C (checkpoint and a resume hint), and a second Ctrl+C (quit at once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eicl_cli import checkpoint, runs
from train_support import TINY, eicl

pytestmark = pytest.mark.slow


def _start(data_dir: Path, *args: str, slow_write: float | str = 0) -> subprocess.Popen:
    env = {**os.environ, "EICL_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    command = ([str(Path(__file__).with_name("slow_checkpoint_writes.py")), str(slow_write)]
               if slow_write else ["-m", "eicl_cli"])
    return subprocess.Popen([sys.executable, *command, "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting")
        time.sleep(0.05)


def test_sigkill_while_writing_a_checkpoint_leaves_a_resumable_run(data_dir: Path,
                                                                   tmp_path: Path):
    run = tmp_path / "run"
    tmp = runs.checkpoint_dir(run) / "step_00000020.safetensors.tmp"
    # Step 10's checkpoint is written whole; step 20's write stops half-way for
    # 60 s, and the process is killed then.
    proc = _start(data_dir, "--config", str(TINY), "--out", str(run), "--set", "run.steps=30",
                  "--set", "run.eval_every=100", slow_write="60@20")
    _wait_for(tmp.exists, proc)
    time.sleep(0.2)  # well inside the half-written file's sleep
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists() and not runs.checkpoint_path(run, 20).exists()
    assert checkpoint.read_metadata(runs.checkpoint_path(run, 10))["step"] == "10"

    res = eicl("train", "--resume", str(run), "--set", "run.steps=20", data_dir=data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "removed step_00000020.safetensors.tmp" in res.stderr
    assert [s for s, _ in runs.list_checkpoints(run)] == [10, 20]
    assert not list(runs.checkpoint_dir(run).glob("*.tmp"))
    assert [r["step"] for r in runs.read_metrics(run, kind="train")] == [10, 20]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_tells_how_to_resume(data_dir: Path, tmp_path: Path, sig):
    # SIGTERM: what a job scheduler (SLURM, Kubernetes) sends before it kills.
    run = tmp_path / "run"
    proc = _start(data_dir, "--config", str(TINY), "--out", str(run), "--set",
                  "run.steps=100000", "--set", "run.log_every=5", "--set",
                  "run.checkpoint_every=100000", "--set", "run.eval_every=100000")
    _wait_for(lambda: runs.read_metrics(run, kind="train"), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    saved = runs.list_checkpoints(run)
    assert len(saved) == 1
    step = saved[0][0]
    assert step >= 5
    assert f"interrupted at step {step}; resume with: eicl train --resume {run}" in out
    assert "Traceback" not in err


def test_second_ctrl_c_quits_at_once(data_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    # Every checkpoint write sleeps 60 s half-way, so the first Ctrl+C's save is
    # still running when the second arrives.
    proc = _start(data_dir, "--config", str(TINY), "--out", str(run), "--set",
                  "run.steps=100000", "--set", "run.log_every=5", "--set",
                  "run.checkpoint_every=100000", "--set", "run.eval_every=100000",
                  slow_write=60)
    _wait_for(lambda: runs.read_metrics(run, kind="train"), proc)
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: list(runs.checkpoint_dir(run).glob("*.tmp")), proc)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 20
    assert proc.returncode == 130, out + err
    assert "stopped without saving" in err and "Traceback" not in err
    assert not runs.list_checkpoints(run)
