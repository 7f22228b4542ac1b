"""The Slurm launcher: a sweep as one Slurm job array, submitted through
submitit, each array task training one run (or, with --stack K, one stack of
runs) with the very command the local launcher runs, into the same sweep
folder (which must be on a filesystem the nodes share).

Besides what the local launcher writes, the sweep folder holds::

    SWEEP_OUT/slurm.json             each run's array task: job id, its runs,
                                     its submitit log
    SWEEP_OUT/slurm/<job>/           submitit's pickles, sbatch script and logs

Time limits and preemption: submitit sends a task USR2 before its time
runs out (or when it is interrupted); the task then stops its trainer with
SIGINT, which saves a checkpoint, and requeues itself; the requeued task
resumes the run from that checkpoint with `eicl train --resume`. A task
requeued by Slurm itself (PreemptMode=REQUEUE) starts again from its first
submission and finds the checkpoint the same way, since which command to run
is decided from the run folder when the task starts.

Submitting again submits only runs that are neither finished nor queued or
running on the cluster; the sweep folder's lock is held while submitting, and
each run folder's train lock refuses a second trainer.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import runs
from ..errors import EiclError
from ..eval_modes import ICL_MODE, iwl_mode
from ..files import atomic_write_bytes, read_text
from .local import (LOG_DIR, plan_stacked_tasks, plan_tasks, prepare_fresh, stack_command,
                    stack_groups, sweep_lock, train_command)
from .manifest import is_finished, latest_eval, read_manifest, run_progress, statuses
from .slurm_settings import executor_parameters

RECORD = "slurm.json"
SUBMITIT_DIR = "slurm"
INSTALL_HINT = "pip install 'eicl[slurm]'"
# Every requeue resumes from a newer checkpoint, so a long run may need many;
# submitit's default (3) would end a run that needs a fourth time slot.
MAX_REQUEUES = 100
# Cluster states in which a task still holds its runs: not submitted again.
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING",
                    "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"})
SHOWN = {"PENDING": "pending", "RUNNING": "running", "REQUEUED": "requeued",
         "FAILED": "failed", "TIMEOUT": "timed out", "CANCELLED": "cancelled",
         "COMPLETED": "done", "OUT_OF_MEMORY": "out of memory", "NODE_FAIL": "node failed",
         "PREEMPTED": "preempted", "COMPLETING": "running", "CONFIGURING": "pending"}
# Exit codes of a trainer stopped by a signal (it saved a checkpoint first).
_STOPPED = (130, 143, -signal.SIGINT, -signal.SIGTERM)


def require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise EiclError(f"--launcher slurm needs submitit: {INSTALL_HINT}") from None
    return submitit


def task_command(sweep_dir: Path, names: list[str]) -> list[str]:
    """The local launcher's command for these runs, resuming a run that has a
    folder, decided now (a requeued task finds the checkpoint it left)."""
    if len(names) == 1:
        return train_command(sweep_dir, names[0], runs.is_run_dir(Path(sweep_dir) / names[0]))
    return stack_command(sweep_dir, names)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [l.strip() for l in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [l for l in lines if l and not l.startswith("=== ")]
    errors = [l for l in lines if l.startswith("error:")]
    return (errors or lines or [""])[-1]


class TrainTask:
    """One array task: runs the trainer as a child process and waits for it.

    submitit calls `checkpoint` on its checkpoint signal (USR2): the child
    gets SIGINT, saves a checkpoint and exits, and the returned submission of
    this same task is what the requeued job runs."""

    def __init__(self, stop_timeout_s: float = 120.0, signal_wait_s: float = 60.0) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.signal_wait_s = signal_wait_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None  # a process does not travel with a requeue
        return state

    def __call__(self, sweep_dir: str, names: list[str]) -> str:
        folder = Path(sweep_dir)
        steps = {r["name"]: r["config"]["run"]["steps"] for r in read_manifest(folder)["runs"]}

        def finished() -> bool:
            return all(is_finished(folder / n, steps[n]) for n in names)

        if finished():
            return "finished"
        command = task_command(folder, names)
        log_path = folder / LOG_DIR / f"{names[0]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_ARRAY_JOB_ID", "")
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if job else \
            os.environ.get("SLURM_JOB_ID", "?")
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)} "
                      f"[slurm job {job}]\n".encode())
            log.flush()
            # Its own session: only this task decides when the trainer stops.
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        # poll(), not wait(): wait() holds a lock that checkpoint(), run from a
        # signal handler on this thread, would wait on forever.
        while self._proc.poll() is None:
            time.sleep(0.5)
        rc = self._proc.returncode
        if finished():
            return "finished"
        if rc in _STOPPED:
            # Stopped by Slurm's SIGTERM, which comes just before submitit's
            # checkpoint signal on a preemption: give that signal time to requeue.
            deadline = time.time() + self.signal_wait_s
            while time.time() < deadline:
                time.sleep(0.5)
        raise EiclError(f"{', '.join(names)}: trainer exited {rc}: {_last_line(log_path)} "
                        f"(log {log_path})")

    def checkpoint(self, sweep_dir: str, names: list[str]) -> Any:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            deadline = time.time() + self.stop_timeout_s
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self, sweep_dir, names)


# ---------------------------------------------------------------- the record

def read_record(sweep_dir: Path) -> dict[str, dict]:
    """Run name -> {job_id, runs, submitted, stdout, stderr} of its latest task."""
    path = Path(sweep_dir) / RECORD
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text(path, "Slurm record"))
    except json.JSONDecodeError as e:
        raise EiclError(f"{path} is not valid JSON ({e}); was it edited by hand?") from None
    return data.get("runs", {})


def write_record(sweep_dir: Path, record: dict[str, dict]) -> None:
    atomic_write_bytes(Path(sweep_dir) / RECORD,
                       (json.dumps({"format": 1, "runs": record}, indent=1) + "\n").encode())


# ---------------------------------------------------------------- the cluster

def _slurm(*args: str, timeout: float = 60) -> str:
    try:
        p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EiclError(f"{args[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise EiclError(f"{' '.join(args[:2])} did not answer in {timeout:g} s") from None
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise EiclError(f"{args[0]} failed (exit {p.returncode}): {err[-1] if err else ''}")
    return p.stdout


def expand_job_ids(job_id: str) -> list[str]:
    """'123_[0-3,7%2]' (an array's unstarted tasks in sacct) -> 123_0 ... 123_7."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def cluster_states(job_ids: list[str]) -> dict[str, str]:
    """Job id (array_task) -> Slurm state: squeue for queued and running
    tasks (sacct lags a moment behind), sacct for the ended ones."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    found: dict[str, str] = {}
    out = _slurm("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays))
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        for one in expand_job_ids(jid.strip()):
            found[one] = state.split()[0] if state.strip() else "UNKNOWN"
    out = _slurm("squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser())
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        if jid.split("_")[0] in arrays:
            found[jid.strip()] = state.strip()
    return {j: found[j] for j in job_ids if j in found}


# ---------------------------------------------------------------- submit

@dataclass
class Submission:
    job_id: str | None                 # the array's id; None when nothing was submitted
    tasks: list[list[str]]             # the runs of each array task
    queued: list[str]                  # runs already queued or running: left alone
    finished: list[str]


def _todo(sweep_dir: Path, manifest: dict, record: dict, states: dict[str, str]
          ) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    todo, queued, done = [], [], []
    for st in statuses(sweep_dir, manifest):
        entry = record.get(st.name, {})
        job = entry.get("job_id")
        state = states.get(job) if job else None
        if st.state == "finished":
            done.append(st.name)
        elif job and (state in ACTIVE or (state is None and _recent(entry))):
            queued.append(st.name)
        elif st.state == "running":  # a local sweep trains it
            raise EiclError(f"run {st.name} is being trained by a local sweep; wait for it "
                            "to end or stop it, then submit again")
        else:
            todo.append((st.name, st.state))
    return todo, queued, done


def _recent(entry: dict) -> bool:
    """A task the cluster does not list yet (sacct lags a moment) counts as
    queued for a minute after its submission."""
    return time.time() - entry.get("submitted", 0) < 60


def submit(sweep_dir: Path, manifest: dict, settings: dict[str, Any], stack: int = 1,
           task: TrainTask | None = None) -> Submission:
    """Submit every run not finished and not queued as one job array."""
    submitit = require_submitit()
    sweep_dir = Path(sweep_dir).resolve()
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    with sweep_lock(sweep_dir):
        record = read_record(sweep_dir)
        states = cluster_states(sorted({e["job_id"] for e in record.values()}))
        todo, queued, done = _todo(sweep_dir, manifest, record, states)
        for name, _ in todo:
            if not runs.is_run_dir(sweep_dir / name):
                prepare_fresh(sweep_dir / name)
        planned = (plan_stacked_tasks(sweep_dir, todo, manifest, stack) if stack > 1
                   else plan_tasks(sweep_dir, todo))
        groups = [t.runs for t in planned]
        if not groups:
            return Submission(None, [], queued, done)
        executor = submitit.AutoExecutor(folder=sweep_dir / SUBMITIT_DIR / "%j", cluster="slurm",
                                         slurm_max_num_timeout=MAX_REQUEUES)
        try:
            executor.update_parameters(name=f"eicl-{sweep_dir.name}",
                                       **executor_parameters(settings))
            jobs = executor.map_array(task or TrainTask(), [str(sweep_dir)] * len(groups), groups)
        except (ValueError, subprocess.CalledProcessError, OSError) as e:
            raise EiclError(f"submitting the job array failed: {_one_line(e)}") from None
        except Exception as e:  # submitit's FailedJobError and kin: sbatch refused it
            if type(e).__module__.startswith("submitit"):
                raise EiclError(f"sbatch refused the job array: {_one_line(e)}") from None
            raise
        now = time.time()
        for job, group in zip(jobs, groups):
            for name in group:
                record[name] = {"job_id": job.job_id, "runs": group, "submitted": now,
                                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        write_record(sweep_dir, record)
        return Submission(jobs[0].job_id.split("_")[0], groups, queued, done)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    stderr = getattr(e, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [l for l in (stderr or "").strip().splitlines() if l.strip()] or text
    return lines[-1] if lines else type(e).__name__


# ---------------------------------------------------------------- status, cancel

@dataclass
class TaskStatus:
    """What `eicl sweep --status` shows for one run."""
    name: str
    values: dict[str, Any]
    seed: int
    job_id: str | None
    slurm_state: str | None            # sacct's / squeue's word
    state: str                         # shown: pending, running, ..., done, not submitted
    step: int | None
    steps: int
    icl: float | None
    iwl: float | None
    iwl_mode: str | None
    steps_per_s: float | None
    error: str | None = None
    log: str | None = None
    slurm_log: str | None = None
    extra: dict = field(default_factory=dict)


def _latest_steps_per_s(run_dir: Path) -> float | None:
    path = Path(run_dir) / runs.METRICS_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - (1 << 16)))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train" and "steps_per_s" in rec:
            return float(rec["steps_per_s"])
    return None


def task_statuses(sweep_dir: Path, manifest: dict | None = None) -> list[TaskStatus]:
    sweep_dir = Path(sweep_dir)
    manifest = manifest or read_manifest(sweep_dir)
    record = read_record(sweep_dir)
    states = cluster_states(sorted({e["job_id"] for e in record.values()}))
    out = []
    for r in manifest["runs"]:
        name, steps = r["name"], r["config"]["run"]["steps"]
        run_dir = sweep_dir / r["run_dir"]
        mode = iwl_mode(r["config"]["eval"]["modes"])
        ev = latest_eval(run_dir, tuple(m for m in (ICL_MODE, mode) if m)) \
            if run_dir.is_dir() else {}
        entry = record.get(name, {})
        job = entry.get("job_id")
        raw = states.get(job) if job else None
        if job is None:
            shown = "done" if is_finished(run_dir, steps) else "not submitted"
        elif raw is None:
            shown = "submitted"  # sacct lags a moment behind sbatch
        else:
            shown = SHOWN.get(raw, raw.lower())
        log = sweep_dir / LOG_DIR / f"{entry.get('runs', [name])[0]}.log"
        error = None
        if raw in ("FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL") \
                and not is_finished(run_dir, steps):
            error = _last_line(log) or _last_line(Path(entry.get("stderr", ""))) or None
        out.append(TaskStatus(
            name=name, values=r["values"], seed=r["seed"], job_id=job, slurm_state=raw,
            state=shown, step=run_progress(run_dir), steps=steps,
            icl=ev.get(ICL_MODE, {}).get("accuracy_query"),
            iwl=ev.get(mode, {}).get("accuracy_query") if mode else None, iwl_mode=mode,
            steps_per_s=_latest_steps_per_s(run_dir), error=error,
            log=str(log) if log.is_file() else None, slurm_log=entry.get("stderr")))
    return out


def cancel(sweep_dir: Path) -> list[str]:
    """scancel every recorded task still queued or running; checkpoints stay.
    Returns the job ids cancelled."""
    record = read_record(sweep_dir)
    ids = sorted({e["job_id"] for e in record.values()})
    states = cluster_states(ids)
    active = [j for j in ids if states.get(j) in ACTIVE]
    if active:
        _slurm("scancel", *active)
    return active


# ---------------------------------------------------------------- dry run

@dataclass
class PlannedTask:
    index: int
    runs: list[str]
    command: list[str]


def plan(sweep_dir: Path, sweep_runs: list, run_statuses: list, stack: int
         ) -> list[PlannedTask]:
    """The array tasks a submission would make now, without writing anything;
    runs already queued on the cluster (per slurm.json) are left out."""
    sweep_dir = Path(sweep_dir)
    record = read_record(sweep_dir)
    states = cluster_states(sorted({e["job_id"] for e in record.values()})) if record else {}
    queued = {n for n, e in record.items() if states.get(e["job_id"]) in ACTIVE}
    configs: dict[str, config_mod.Config] = {r.name: r.config for r in sweep_runs}
    progress = {s.name: s.step or 0 for s in run_statuses}
    todo = [s.name for s in run_statuses if s.state != "finished" and s.name not in queued]
    groups = stack_groups(todo, configs.__getitem__, progress.__getitem__, stack)
    return [PlannedTask(i, g, task_command(sweep_dir, g)) for i, g in enumerate(groups)]


def gpu_hours(seconds: float, settings: dict[str, Any]) -> float:
    """Task-seconds, one task after another, as GPU-hours at `gpus` per task."""
    return seconds / 3600 * settings.get("gpus", 0)

