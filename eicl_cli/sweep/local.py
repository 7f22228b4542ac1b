"""The local launcher: each run (or stack of runs) of a sweep as its own
`eicl train` process on this machine, `--jobs` at a time.

Restarting the same sweep skips finished runs, resumes interrupted ones with
`--resume`, and retries failed ones. A run is finished when its newest
checkpoint is at `run.steps`. With `--stack K`, runs of equal shapes and
progress train K to a process in one stacked step.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from .. import config as config_mod
from .. import runs
from ..errors import EiclError
from ..experiment_keys import stack_identity
from ..locks import FolderLock
from . import devices
from .manifest import RunStatus, is_finished, read_state, run_progress, statuses, write_state

LOCK_FILE = ".sweep.lock"
LOG_DIR = "logs"


@dataclass
class Task:
    """One process of the sweep: one run, or (--stack) several runs trained in
    one stacked step."""
    runs: list[str]
    command: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    slot: int = 0  # which of the --jobs slots (and so which GPUs) it runs in


def train_command(sweep_dir: Path, name: str, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "eicl_cli", "train"]
    run_dir = str(Path(sweep_dir) / name)
    if resume:
        return base + ["--resume", run_dir]
    return base + ["--config", str(Path(sweep_dir) / "configs" / f"{name}.toml"), "--out", run_dir]


CommandFn = Callable[[Path, str, bool], list[str]]


def stack_command(sweep_dir: Path, names: list[str]) -> list[str]:
    """One process training several runs in one stacked step (stack.py)."""
    return [sys.executable, "-m", "eicl_cli", "train-stack", "--sweep-dir",
            str(sweep_dir), *names]


T = TypeVar("T")


def stack_groups(items: list[T], config: Callable[[T], config_mod.Config],
                 progress: Callable[[T], int], stack: int) -> list[list[T]]:
    """Runs that can share a step (equal stack identity, equal progress) in
    groups of up to `stack`; the rest alone. Order follows `items`."""
    groups: dict[tuple[str, int], list[T]] = {}
    for item in items:
        groups.setdefault((stack_identity(config(item)), progress(item)), []).append(item)
    return [same[i:i + stack] for same in groups.values() for i in range(0, len(same), stack)]


def plan_stacked_tasks(sweep_dir: Path, todo: list[tuple[str, str]], manifest: dict,
                       stack: int) -> list[Task]:
    """The runs to do in tasks of up to `stack` runs sharing one stacked step."""
    configs = {r["name"]: config_mod.from_dict(r["config"]) for r in manifest["runs"]}
    tasks = []
    for chunk in stack_groups([name for name, _ in todo], configs.__getitem__,
                              lambda name: run_progress(Path(sweep_dir) / name) or 0, stack):
        log = Path(sweep_dir) / LOG_DIR / f"{chunk[0]}.log"
        if len(chunk) == 1:  # nothing to stack it with: an ordinary run
            resume = runs.is_run_dir(Path(sweep_dir) / chunk[0])
            tasks.append(Task(runs=chunk, command=train_command(sweep_dir, chunk[0], resume),
                              log=log))
        else:
            tasks.append(Task(runs=chunk, command=stack_command(sweep_dir, chunk), log=log))
    return tasks


def plan_tasks(sweep_dir: Path, todo: list[tuple[str, str]],
               command: CommandFn = train_command) -> list[Task]:
    """One task per run to do; `todo` is (name, state)."""
    tasks = []
    for name, state in todo:
        run_dir = Path(sweep_dir) / name
        resume = runs.is_run_dir(run_dir)
        tasks.append(Task(runs=[name], command=command(sweep_dir, name, resume),
                          log=Path(sweep_dir) / LOG_DIR / f"{name}.log"))
    return tasks


def prepare_fresh(run_dir: Path) -> None:
    """A run killed before it wrote its config holds at most empty folders:
    clear them so `eicl train --out` finds the folder empty."""
    if not run_dir.exists():
        return
    for p in run_dir.rglob("*"):
        if not p.is_dir():
            raise EiclError(f"{run_dir} holds {p.name} but no config.toml; it is not a run "
                            "this sweep can continue; move it away and start again")
    shutil.rmtree(run_dir)


def sweep_lock(sweep_dir: Path) -> FolderLock:
    """One sweep process per folder (SWEEP_OUT/.sweep.lock)."""
    return FolderLock(Path(sweep_dir) / LOCK_FILE, f"sweep folder {sweep_dir}")


@dataclass
class SweepResult:
    statuses: list[RunStatus]
    interrupted: bool
    launched: int


def run_sweep(sweep_dir: Path, manifest: dict, jobs: int,
              on_change: Callable[[list[RunStatus], str], None] | None = None,
              poll_s: float = 1.0, stop_timeout_s: float = 300.0,
              command: CommandFn = train_command, stack: int = 1) -> SweepResult:
    """Run every run that is not finished, `jobs` at a time.

    Ctrl+C (SIGINT) or SIGTERM stops launching, passes SIGINT to every child
    (each saves a checkpoint and exits) and waits for them; a second signal
    kills them. `on_change(statuses, message)` is called whenever a run starts
    or ends, and every `poll_s` seconds with an empty message. `command`
    builds a run's command line (sweep folder, run name, resume?). With
    `stack` K > 1, runs of equal shapes and progress train K to a process in
    one stacked step (each still in its own run folder; logs/<first run>.log)."""
    sweep_dir = Path(sweep_dir)
    if jobs < 1:
        raise EiclError(f"--jobs {jobs}: must be at least 1")
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    notify = on_change or (lambda s, m: None)
    with sweep_lock(sweep_dir):
        state = read_state(sweep_dir)
        todo = []
        for st in statuses(sweep_dir, manifest):
            if st.state == "running":  # a trainer an earlier, killed sweep left behind
                raise EiclError(f"run {st.name} is still being trained by pid "
                                f"{state[st.name]['pid']} (left by an earlier sweep); "
                                "wait for it to end or stop it, then start the sweep again")
            if st.state != "finished":
                todo.append((st.name, st.state))
            elif state.get(st.name, {}).get("state") != "finished":
                state.setdefault(st.name, {})["state"] = "finished"
        for name, st in todo:
            state[name] = {"state": st, "attempts": state.get(name, {}).get("attempts", 0)}
            if not runs.is_run_dir(sweep_dir / name):
                prepare_fresh(sweep_dir / name)
        write_state(sweep_dir, state)
        queue = (plan_stacked_tasks(sweep_dir, todo, manifest, stack) if stack > 1
                 else plan_tasks(sweep_dir, todo, command))
        active: list[Task] = []
        stopping = {"count": 0}

        def handler(signum: int, frame: Any) -> None:
            stopping["count"] += 1
            for t in active:
                if t.proc and t.proc.poll() is None:
                    try:
                        os.killpg(t.proc.pid, signal.SIGINT if stopping["count"] == 1
                                  else signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        launched = 0
        gpus = devices.visible_gpus()
        slots = devices.device_slots(
            jobs, gpus, [r["config"]["train"]["batch_size"] for r in manifest["runs"]])
        sharing = devices.jobs_per_device(jobs, gpus)
        free = list(range(jobs))
        try:
            while queue or active:
                while queue and len(active) < jobs and not stopping["count"]:
                    task = queue.pop(0)
                    task.slot = free.pop(0)
                    visible = slots[task.slot]
                    env = devices.child_env(dict(os.environ), visible, sharing)
                    where = f" [CUDA_VISIBLE_DEVICES={visible}]" if visible is not None else ""
                    task.log.parent.mkdir(parents=True, exist_ok=True)
                    log = open(task.log, "ab")
                    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                              f"{' '.join(task.command)}{where}\n".encode())
                    log.flush()
                    # Own process group: we decide when children get SIGINT, so a
                    # terminal Ctrl+C and a programmatic stop behave the same.
                    task.proc = subprocess.Popen(task.command, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=env,
                                                 start_new_session=True)
                    log.close()
                    task.started = time.time()
                    active.append(task)
                    launched += 1
                    for name in task.runs:
                        state[name] = {"state": "running", "pid": task.proc.pid,
                                       "started": task.started,
                                       "attempts": state.get(name, {}).get("attempts", 0) + 1}
                    write_state(sweep_dir, state)
                    on = f" on GPU {visible}" if visible is not None else ""
                    notify(statuses(sweep_dir, manifest), f"started {', '.join(task.runs)}{on}")
                if stopping["count"] and queue:
                    queue.clear()
                time.sleep(poll_s)
                done = [t for t in active if t.proc.poll() is not None]
                for task in done:
                    active.remove(task)
                    free.append(task.slot)
                    free.sort()
                    rc = task.proc.returncode
                    for name in task.runs:
                        steps = _steps(manifest, name)
                        if is_finished(sweep_dir / name, steps):
                            new = "finished"
                        elif stopping["count"] or rc in (-signal.SIGINT, 130, -signal.SIGKILL):
                            new = "interrupted"
                        else:
                            new = "failed"
                        state[name].update(state=new, returncode=rc, ended=time.time())
                    write_state(sweep_dir, state)
                    notify(statuses(sweep_dir, manifest),
                           f"{', '.join(task.runs)} {state[task.runs[0]]['state']} (exit {rc})")
                if not done:
                    notify(statuses(sweep_dir, manifest), "")
                if stopping["count"] and active:
                    _wait_or_kill(active, stop_timeout_s, stopping)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for t in active:  # only on an unexpected error: never leave children behind
                if t.proc and t.proc.poll() is None:
                    os.killpg(t.proc.pid, signal.SIGKILL)
                    t.proc.wait()
        return SweepResult(statuses=statuses(sweep_dir, manifest),
                           interrupted=bool(stopping["count"]), launched=launched)


def _wait_or_kill(active: list[Task], timeout_s: float, stopping: dict) -> None:
    """After a stop request, give children time to checkpoint, then kill them."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(t.proc.poll() is None for t in active):
        time.sleep(0.2)
    for t in active:
        if t.proc.poll() is None:
            stopping["count"] += 1
            os.killpg(t.proc.pid, signal.SIGKILL)


def _steps(manifest: dict, name: str) -> int:
    for r in manifest["runs"]:
        if r["name"] == name:
            return r["config"]["run"]["steps"]
    raise KeyError(name)


def continue_command(sweep_file: str | Path, out: str | Path | None, overrides: list[str],
                     stack: int = 1, jobs: int = 1) -> str:
    """The command line that continues an interrupted sweep: its file, folder
    and --set values (other values would be refused as a different config),
    and its --stack and --jobs."""
    words = ["eicl", "sweep", str(sweep_file)] + (["--out", str(out)] if out else [])
    for override in overrides:
        words += ["--set", override]
    words += [f"--{name}={value}" for name, value in (("stack", stack), ("jobs", jobs))
              if value > 1]
    return shlex.join(words)

