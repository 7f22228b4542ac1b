"""Which GPUs and how much of their memory each job of `eicl sweep --jobs N`
gets.

On a machine with several NVIDIA GPUs every `eicl train` would otherwise see
all of them and split its batch over all of them, N processes at once. Instead
the sweep gives each of its N job slots its own share: with N >= G GPUs, slot
i gets GPU i mod G (jobs share a GPU only when there are more jobs than GPUs);
with N < G, each slot gets G // N GPUs (fewer if the runs' batch size
would not split evenly) and trains data parallel over them. The
GPUs are found without starting CUDA in the sweep process: CUDA_VISIBLE_DEVICES
when it is set (so it also chooses the pool), else `nvidia-smi`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs children may use (indices or UUIDs); [] when none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = []
        for g in (g.strip() for g in env.split(",")):
            if not g or g.startswith("-"):  # CUDA ignores everything from an invalid entry on
                break
            gpus.append(g)
        return gpus
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]


def device_slots(jobs: int, gpus: list[str], batch_sizes: list[int] = ()) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each job slot; None leaves the environment as
    it is (no GPU, or only one: every job shares it). A slot's GPU count
    divides every one of `batch_sizes` (a run splits its batch over them)."""
    if len(gpus) < 2:
        return [None] * jobs
    if jobs >= len(gpus):
        return [gpus[i % len(gpus)] for i in range(jobs)]
    per = len(gpus) // jobs
    while per > 1 and any(b % per for b in batch_sizes):
        per -= 1
    return [",".join(gpus[i * per:(i + 1) * per]) for i in range(jobs)]


def jobs_per_device(jobs: int, gpus: list[str]) -> int:
    return math.ceil(jobs / len(gpus)) if len(gpus) >= 2 else jobs


def child_env(base: dict[str, str], visible: str | None, sharing: int) -> dict[str, str]:
    """A job's environment: its GPUs, and (when `sharing` jobs share one
    accelerator) a memory fraction each, since JAX would let every one of
    them claim 75% of it. A fraction the user set is kept."""
    env = dict(base)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if sharing > 1 and MEM_FRACTION not in base:
        env[MEM_FRACTION] = f"{min(0.75, 0.9 / sharing):.3f}"
    return env
