"""One trainer per run folder, one sweep per sweep folder (locks.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


_HOLDER = r"""
import sys, time
from pathlib import Path
from eicl_cli.locks import FolderLock
with FolderLock(Path(sys.argv[1]), "thing"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_holder_is_named_and_its_lock_is_free_once_it_is_killed(tmp_path: Path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(EiclError, match=rf"^thing is in use by pid {holder.pid}; wait"):
            FolderLock(path, "thing").__enter__()
        assert path.read_text().split() == [socket.gethostname(), str(holder.pid)]
    finally:
        holder.kill()  # SIGKILL: it cannot clean up, the kernel drops its lock
        holder.wait()
    assert path.exists()
    with FolderLock(path, "thing"):
        assert path.read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not path.exists()


def test_one_process_cannot_take_its_own_lock_twice(tmp_path: Path):
    path = tmp_path / ".lock"
    with FolderLock(path, "thing"):
        with pytest.raises(EiclError, match=rf"in use by pid {os.getpid()}; wait"):
            FolderLock(path, "thing").__enter__()
        assert path.exists()  # the refused one leaves it alone
    assert not path.exists()


def test_a_lock_file_that_is_not_utf8_is_a_refusal_or_taken_over_not_a_traceback(
        tmp_path: Path):
    path = tmp_path / ".lock"
    with FolderLock(path, "thing"):
        path.write_bytes(b"\xff\xfe garbage \x00")  # held, its text unreadable
        with pytest.raises(EiclError, match="in use by"):
            FolderLock(path, "thing").__enter__()
    path.write_bytes(b"\xff\xfe garbage \x00")  # left behind, nobody holds it
    with FolderLock(path, "thing"):
        assert path.read_text().split()[1] == str(os.getpid())


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


# Once all three have started, for half a second, each contender tries the
# lock over and over; inside, it creates a marker file with O_EXCL (which
# fails if another holder is inside) and removes it on the way out. It
# prints its entries, overlaps and refusals.
_CONTENDER = r"""
import os, random, sys, time
from pathlib import Path
from eicl_cli.errors import EiclError
from eicl_cli.locks import FolderLock
lock, marker, me = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ready = lock.parent / "ready"
ready.mkdir(exist_ok=True)
(ready / me).touch()
while len(os.listdir(ready)) < 3:
    time.sleep(0.001)
entered = overlaps = refused = 0
end = time.monotonic() + 0.5
while time.monotonic() < end:
    try:
        with FolderLock(lock, "thing"):
            entered += 1
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                overlaps += 1
                continue
            os.close(fd)
            os.sched_yield()
            os.unlink(marker)
    except EiclError:
        refused += 1
    time.sleep(random.random() * 1e-4)  # let the others in
print(entered, overlaps, refused)
"""


def test_contending_processes_never_hold_the_lock_together(tmp_path: Path):
    # The pid-file protocol let a rival read a lock created but not yet
    # written, take it for a dead owner's and delete it, and a finishing
    # holder delete a lock that was already another's: two holders at once.
    lock, marker = tmp_path / ".train.lock", tmp_path / "inside"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(lock), str(marker), str(i)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
             for i in range(3)]
    counts = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    entered, overlaps, refused = (sum(c[i] for c in counts) for i in range(3))
    assert overlaps == 0, counts
    assert entered > 0 and refused > 0, counts  # they did contend
    assert not lock.exists() and not marker.exists()
