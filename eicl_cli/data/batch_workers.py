"""Stacked runs' training batches, drawn by worker processes.

A stacked step (`eicl sweep --stack K`) trains K runs at once, and each run
draws its own batches: on the training process's one thread that is K runs'
drawing per step, which on a GPU can take longer than a small model's
stacked step itself (docs/performance.md). A training batch is
a pure function of (run seed, step), so any process can draw any run's
batches: worker w draws runs w, w + W, ... of every call, all workers at
once, and the next call's while the device computes the current one. The
batches are identical to those drawn in-process (tests/test_batch_workers.py).

Each worker is `python -m eicl_cli.data.batch_workers`, talking over its
stdin and stdout: first the runs' resolved configs (TOML) and the dataset's
class tables, then one JSON line per call asked for; the answer is each of
its runs' DEVICE_FIELDS as one raw int32 array (_send_fields). A plain subprocess
(not multiprocessing) imports NumPy and the generator only, never the
caller's script or JAX, and a worker that dies is an EOF here, not a hang.
Workers ignore SIGINT: Ctrl-C is the training loop's to handle (checkpoint,
then stop); closing their stdin ends them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import config as config_mod
from ..config import Config
from ..errors import EiclError
from .sequences import DEVICE_FIELDS, SequenceGenerator, train_fields


def worker_count(requested: int, runs: int, backend: str, cpus: int | None = None) -> int:
    """How many processes draw `runs` stacked runs' batches.

    requested (train.draw_workers) >= 0 is taken as given, capped at one per
    run; -1 is auto: none on a CPU backend (its cores run the step itself),
    elsewhere one per run up to the usable cores less the training
    process's, and none when that leaves fewer than 2 (one worker only moves
    the drawing, it does not share it). A single run never uses workers."""
    if runs <= 1:
        return 0
    if requested >= 0:
        return min(requested, runs)
    if backend == "cpu":
        return 0
    n = min(runs, (cpus or usable_cpus()) - 1)
    return n if n >= 2 else 0


def usable_cpus() -> int:
    """The cores this process may run on (a batch scheduler's or taskset's
    share, where the OS reports one), else all of the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class ClassTables:
    """What SequenceGenerator reads of a Dataset: its class tables, no pixels."""

    class_images: np.ndarray
    class_variant: np.ndarray
    class_source: np.ndarray


_TABLES = tuple(f.name for f in dataclasses.fields(ClassTables))


# The class tables travel once, in NumPy's .npy layout (header, then the raw
# bytes), written and read through the streams' buffers: np.save and np.load
# reach past them to the file descriptor, which a pipe's buffered stream
# cannot share.
def _write(stream: IO[bytes], arrays: list[np.ndarray]) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        np.lib.format.write_array_header_1_0(stream, np.lib.format.header_data_from_array_1_0(a))
        stream.write(a.tobytes())


def _read(stream: IO[bytes]) -> np.ndarray:
    np.lib.format.read_magic(stream)
    shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    return np.frombuffer(_exactly(stream, int(np.prod(shape)) * dtype.itemsize),
                         dtype).reshape(shape)


def _exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"{len(data)} of {size} bytes")
    return data


# Each run's answer to a call is its DEVICE_FIELDS stacked into one int32
# array, (fields, B, L) or (fields, n, B, L), after a header of 5 int64: the
# number of dimensions and the dimensions (zero-padded): cheaper for the
# training process to parse than .npy headers.
def _send_fields(stream: IO[bytes], fields: dict[str, np.ndarray]) -> None:
    a = np.stack([fields[name] for name in DEVICE_FIELDS]).astype(np.int32, copy=False)
    stream.write(np.array([a.ndim, *a.shape, *[0] * (4 - a.ndim)], np.int64).tobytes())
    stream.write(a.tobytes())


def _receive_fields(stream: IO[bytes]) -> dict[str, np.ndarray]:
    head = np.frombuffer(_exactly(stream, 40), np.int64)
    shape = tuple(int(d) for d in head[1:1 + int(head[0])])
    a = np.frombuffer(_exactly(stream, 4 * int(np.prod(shape))), np.int32).reshape(shape)
    return dict(zip(DEVICE_FIELDS, a))


class BatchWorkers:
    """Worker processes drawing K runs' training batches, calls ahead.

    fields(step, n) returns what [train_fields(g, step, n) for g in the
    runs' generators] would, and before returning asks the workers for the
    AHEAD calls after it, (step + n, n), (step + 2n, n)...; a different next
    call reads and drops those guesses.
    """

    AHEAD = 2

    def __init__(self, dataset: Any, cfgs: list[Config], workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers = {workers} must be >= 1")
        workers = min(workers, len(cfgs))
        self.workers = workers
        self._runs = len(cfgs)
        self._owned = [list(range(w, len(cfgs), workers)) for w in range(workers)]
        self._asked: list[tuple[int, int]] = []  # calls asked for and not yet read, in order
        self._procs: list[subprocess.Popen] = []
        # The package's own folder first: the workers import this eicl_cli
        # whatever the caller's working directory and path.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            for runs in self._owned:
                proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
                self._procs.append(proc)
                header = {"configs": [config_mod.to_toml(cfgs[r]) for r in runs]}
                proc.stdin.write((json.dumps(header) + "\n").encode())
                _write(proc.stdin, [getattr(dataset, name) for name in _TABLES])
                proc.stdin.flush()
        except BaseException:
            self.close()
            raise

    def _ask(self, step: int, n: int) -> None:
        line = (json.dumps({"step": step, "n": n}) + "\n").encode()
        for w, proc in enumerate(self._procs):
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._failed(w)
        self._asked.append((step, n))

    def _failed(self, w: int) -> None:
        proc = self._procs[w]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        raise EiclError(f"batch worker {w} stopped (exit code {code}; its error, if it printed "
                        "one, is above); train.draw_workers = 0 draws the batches in the "
                        "training process")

    def _collect(self) -> list[dict[str, np.ndarray]]:
        """The answers to the oldest call asked for: every run's fields."""
        out: list[dict[str, np.ndarray] | None] = [None] * self._runs
        for w, (proc, runs) in enumerate(zip(self._procs, self._owned)):
            for r in runs:
                try:
                    out[r] = _receive_fields(proc.stdout)
                except (ValueError, EOFError, OSError):  # a short read: the worker is gone
                    self._failed(w)
        self._asked.pop(0)
        return out  # type: ignore[return-value]

    def fields(self, step: int, n: int = 1) -> list[dict[str, np.ndarray]]:
        """Every run's training batches of steps step .. step + n - 1."""
        while self._asked and self._asked[0] != (step, n):
            self._collect()  # a guess that missed: read and drop it
        if not self._asked:
            self._ask(step, n)
        out = self._collect()
        while len(self._asked) < self.AHEAD:
            last, size = self._asked[-1] if self._asked else (step, n)
            self._ask(last + size, size)
        return out

    def close(self) -> None:
        """End the workers (their stdin closes; they exit at its end)."""
        for proc in self._procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.stdout.close()
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs, self._asked = [], []

    def __enter__(self) -> "BatchWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """A worker's life: read its runs and the class tables, then answer
    every call asked for until stdin ends."""
    header = json.loads(stdin.readline())
    tables = ClassTables(*(_read(stdin) for _ in _TABLES))
    generators = [SequenceGenerator(tables, config_mod.from_toml(text))
                  for text in header["configs"]]
    for line in stdin:
        ask = json.loads(line)
        for generator in generators:
            _send_fields(stdout, train_fields(generator, ask["step"], ask["n"]))
        stdout.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol keeps the real stdout; anything printed goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        _serve(sys.stdin.buffer, protocol)
    except BrokenPipeError:  # closed while answering a guess: nobody needs it
        os._exit(0)
