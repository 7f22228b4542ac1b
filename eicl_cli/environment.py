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


# Where compiled programs are kept: a folder, or "off" (or empty) for none.
COMPILE_CACHE_ENV = "EICL_COMPILE_CACHE"


def compile_cache_root() -> Path | None:
    """$EICL_COMPILE_CACHE, else $XDG_CACHE_HOME/eicl/jax, else
    ~/.cache/eicl/jax; None when the cache is off (EICL_COMPILE_CACHE=off or
    empty, or the older EICL_NO_COMPILE_CACHE=1).

    Per user, not in the data folder as before: a lab shares that folder,
    and the cache holds native code that eicl loads and runs."""
    if os.environ.get("EICL_NO_COMPILE_CACHE"):
        return None
    if COMPILE_CACHE_ENV in os.environ:
        value = os.environ[COMPILE_CACHE_ENV].strip()
        return None if value.lower() in ("", "off") else Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec ignores a relative XDG_CACHE_HOME.
    base = Path(xdg) if os.path.isabs(xdg) else Path("~/.cache").expanduser()
    return base / "eicl" / "jax"


def compile_cache_dir() -> Path | None:
    """<root>/cpus<N>, N the CPUs this process may run on (None when off):
    XLA's CPU code is built for the thread pool it compiles with, and JAX's
    cache key does not include it, so a step compiled with one core runs
    slower when reused by a process with more (docs/performance.md)."""
    root = compile_cache_root()
    return None if root is None else root / f"cpus{usable_cpu_count()}"


def enable_compile_cache() -> Path | None:
    """Keep XLA's compiled programs in compile_cache_dir(), so the second run
    of a config (a sweep's other points, a resume, `eicl eval`) skips most of
    the compile time; returns the folder, or None when it is not used. An
    explicit JAX_COMPILATION_CACHE_DIR wins; a folder that cannot be made
    (a read-only home) means no cache, not an error."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = compile_cache_dir()
    if folder is None:
        return None
    try:
        # Private where eicl makes it: only this user writes code it will run.
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


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
