"""One trainer per run folder, one sweep per sweep folder (locks.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from eicl_cli import runs
from eicl_cli.errors import EiclError
from eicl_cli.locks import FolderLock
from train_support import eicl, tiny, train_run

DEAD_PID = 999_999_999


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path: Path):
    path = tmp_path / ".lock"
    with FolderLock(path, "thing"):
        assert path.read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not path.exists()

    path.write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live process here
    with pytest.raises(EiclError, match=rf"thing is in use by pid {os.getppid()}; wait"):
        FolderLock(path, "thing").__enter__()
    path.write_text(str(os.getppid()))  # the older form: a pid alone
    with pytest.raises(EiclError, match="in use by pid"):
        FolderLock(path, "thing").__enter__()

    for stale in (f"{socket.gethostname()} {DEAD_PID}", str(DEAD_PID), "", "garbage"):
        path.write_text(stale)
        with FolderLock(path, "thing"):
            assert path.read_text().split()[1] == str(os.getpid())
        assert not path.exists()

    # Another host's process cannot be checked from here: refused, with the way out.
    path.write_text(f"node-elsewhere-17 {DEAD_PID}\n")
    with pytest.raises(EiclError, match=rf"in use by pid {DEAD_PID} on host node-elsewhere-17; "
                                        rf"wait for it, or delete {path}"):
        FolderLock(path, "thing").__enter__()
    assert path.exists()


@pytest.mark.slow  # a short run, then a fresh process
def test_a_second_trainer_on_one_run_is_refused(data_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = tiny(data_dir, "run.steps=4", "run.log_every=2", "run.eval_every=4",
               "run.checkpoint_every=2")
    assert train_run(cfg, run).status == "finished"
    assert not (run / runs.TRAIN_LOCK).exists()  # released at the end
    metrics = (run / runs.METRICS_FILE).read_bytes()

    # As if another `eicl train --resume` were training it right now.
    (run / runs.TRAIN_LOCK).write_text(f"{socket.gethostname()} {os.getppid()}\n")
    res = eicl("train", "--resume", str(run), "--set", "run.steps=6", data_dir=data_dir)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: run {run} is in use by pid {os.getppid()}; wait for it to end or stop it first"]
    assert (run / runs.METRICS_FILE).read_bytes() == metrics
    assert runs.list_checkpoints(run)[-1][0] == 4

    # Its owner gone (killed without cleaning up): the next trainer takes over.
    (run / runs.TRAIN_LOCK).write_text(f"{socket.gethostname()} {DEAD_PID}\n")
    res = eicl("train", "--resume", str(run), "--set", "run.steps=6", data_dir=data_dir)
    assert res.returncode == 0, res.stderr
    assert runs.list_checkpoints(run)[-1][0] == 6
    assert not (run / runs.TRAIN_LOCK).exists()
