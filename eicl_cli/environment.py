"""What a run ran on: package versions, Python, the processor, JAX's backend
and devices.

Float32 training repeats bit for bit on one machine and one set of versions;
elsewhere it drifts apart in rounding (the quickstart's seed 0 on another CPU
agreed for 300 steps). So every start and resume of a run appends one of these
records to RUN/environment.jsonl, and two runs that differ can be told apart.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

PACKAGES = ("eicl", "jax", "jaxlib", "equinox", "optax", "numpy", "safetensors")


def cpu_model() -> str:
    """The processor's name as the kernel reports it (Linux), else what
    Python's platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def usable_cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def enable_compile_cache(data_dir: Path) -> None:
    """Keep XLA's compiled programs in <data dir>/jax-cache, so the second run
    of a config (a sweep's other points, a resume, `eicl eval`) skips most of
    the compile time. An explicit JAX_COMPILATION_CACHE_DIR wins; setting
    EICL_NO_COMPILE_CACHE=1 turns it off."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("EICL_NO_COMPILE_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir(data_dir)))


def compile_cache_dir(data_dir: Path) -> Path:
    """<data dir>/jax-cache/cpus<N>, N the CPUs this process may run on: XLA's
    CPU code is built for the thread pool it compiles with, and JAX's cache
    key does not include it, so a step compiled with one core runs slower
    when reused by a process with more (docs/performance.md)."""
    return Path(data_dir) / "jax-cache" / f"cpus{usable_cpu_count()}"


def record(step: int) -> dict[str, Any]:
    """One environment record, for a run (re)starting at `step`."""
    devices = jax.devices()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": step,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": usable_cpu_count(),
        "packages": {p: _version(p) for p in PACKAGES},
        "backend": jax.default_backend(),
        "devices": [getattr(d, "device_kind", d.platform) for d in devices],
        "processes": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "argv": sys.argv[1:],
    }
