"""Shared helpers of the train / eval tests: a synthetic cache and a tiny config."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from eicl_cli import config

TINY = Path(__file__).parent / "configs" / "tiny.toml"
N_CLASSES = 40  # the synthetic cache's classes; tiny.toml keeps all of them


def make_synthetic_cache(data_dir: Path) -> Path:
    from eicl_cli.prepare import prepare_data
    prepare_data("synthetic", data_dir, classes=N_CLASSES)
    return data_dir


def tiny(data_dir: Path, *overrides: str) -> config.Config:
    return config.load(TINY, [f'data.data_dir="{data_dir}"', *overrides])


def train_run(cfg: config.Config, run_dir: Path, resume: bool = False):
    """Train a run folder in this process, as `eicl train` does: a new folder
    gets the resolved config first; resume=True continues the folder."""
    from eicl_cli import runs
    from eicl_cli import training
    if not resume:
        cfg = training.resolved_config(cfg)
        runs.new_run_dir(cfg, None, run_dir)
        runs.write_config(run_dir, cfg)
    return training.train_runs([cfg], [run_dir], resume=resume, live=False)


def new_run_dirs(cfgs: list[config.Config], root: Path, prefix: str) -> list[Path]:
    """One new run folder per (resolved) config, root/prefix0, root/prefix1...,
    each holding its config as `eicl sweep` leaves them for a stacked process."""
    from eicl_cli import runs
    dirs = []
    for i, cfg in enumerate(cfgs):
        d = Path(root) / f"{prefix}{i}"
        runs.new_run_dir(cfg, None, d)
        runs.write_config(d, cfg)
        dirs.append(d)
    return dirs


def interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> str:
    """Send `proc` Ctrl+C (SIGINT) once ready() is true, then return its
    output; it is killed if it outlives the test."""
    import signal
    import time
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return text


def tiny_sweep_file(path: Path, sets: dict, grid: dict | None = None) -> Path:
    """A sweep file over the tiny config: seeds 0 and 1, `sets` for every
    run and `grid` axes, if any."""
    import tomli_w
    spec = {"base": TINY.as_posix(), "seeds": [0, 1], "set": sets}
    if grid:
        spec["grid"] = grid
    path.write_text(tomli_w.dumps(spec))
    return path


def sweep_process(sweep_file: Path, out: Path, data_dir: Path, *args: str) -> subprocess.Popen:
    """`eicl sweep SWEEP_FILE --out OUT ARGS` in a fresh process, its output
    (stdout and stderr) one unbuffered text pipe."""
    env = {**os.environ, "EICL_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "eicl_cli", "sweep", str(sweep_file),
                             "--out", str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def eicl(*args: str, data_dir: Path, env: dict | None = None, timeout: float = 300,
         **popen) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (stdout is a pipe: plain log lines)."""
    full_env = {**os.environ, "EICL_DATA_DIR": str(data_dir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "eicl_cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load
    return load(Path(path).read_bytes())


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging, a call that does not return in time."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
