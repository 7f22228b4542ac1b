"""The `eicl` process re-executes itself once with glibc's malloc asking for
transparent huge pages (hugepages.py), unless the user set GLIBC_TUNABLES."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from eicl_cli.hugepages import TUNABLE, wanted

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.parametrize("environ, libc, system, expected", [
    ({}, ("glibc", "2.36"), "linux", True),
    ({}, ("glibc", "2.35"), "linux", True),
    ({}, ("glibc", "2.34"), "linux", False),   # no hugetlb tunable yet
    ({}, ("glibc", "3.0"), "linux", True),
    ({"GLIBC_TUNABLES": ""}, ("glibc", "2.36"), "linux", False),  # the user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.36"), "linux", False),
    ({}, ("", ""), "linux", False),            # musl
    ({}, ("glibc", "2.36"), "darwin", False),
    ({}, ("glibc", "unknown"), "linux", False),
])
def test_wanted_only_on_linux_glibc_2_35_without_user_tunables(environ, libc, system, expected):
    assert wanted(environ, libc, system) is expected


# The child prints a line before and after the re-exec point, then mallocs
# and touches 64 MiB through libc itself (not NumPy, which asks for huge
# pages on its own) and reports how much of the process is on huge pages.
_CHILD = """
import ctypes, os
print("start", os.getpid(), flush=True)
from eicl_cli.hugepages import reexec_with_huge_pages
reexec_with_huge_pages()
def huge_kib():
    with open("/proc/self/smaps") as f:
        return sum(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:"))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = huge_kib()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
print("after", os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), huge_kib() - before)
"""


def _untuned() -> dict[str, str]:
    """This environment without GLIBC_TUNABLES: as a user starts eicl."""
    return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def _child(**env: str) -> list[list[str]]:
    full = _untuned() | env
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


@pytest.mark.skipif(not wanted({}, platform.libc_ver(), sys.platform),
                    reason="needs Linux with glibc 2.35 or later")
def test_reexec_once_with_the_tunable_and_large_blocks_on_huge_pages():
    lines = _child()
    # The same process (exec keeps the PID) started twice, went on once.
    assert [w[0] for w in lines] == ["start", "start", "after"]
    assert lines[0][1] == lines[1][1] == lines[2][1]
    assert lines[2][2] == repr(TUNABLE)
    opted_out = _child(GLIBC_TUNABLES="")
    assert [w[0] for w in opted_out] == ["start", "after"] and opted_out[1][2] == "''"

    mode = THP.read_text() if THP.exists() else "[never]"
    if "[never]" in mode:
        pytest.skip(f"transparent huge pages are off here ({THP}: {mode.strip()})")
    assert int(lines[2][3]) >= 32 << 10  # KiB: at least half of the block
    if "[madvise]" in mode:  # only the tunable's madvise gives huge pages
        assert int(opted_out[1][3]) == 0


_CALLER = """
import os, sys
print("start", flush=True)
sys.argv = ["someone_elses_script.py", "--help"]
from eicl_cli.__main__ import main
try:
    main()
except SystemExit:
    pass
print("tunables", repr(os.environ.get("GLIBC_TUNABLES")))
"""


@pytest.mark.skipif(not wanted({}, platform.libc_ver(), sys.platform),
                    reason="needs Linux with glibc 2.35 or later")
def test_main_called_from_another_program_does_not_reexec_it():
    env = _untuned()
    proc = subprocess.run([sys.executable, "-c", _CALLER], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("start") == 1 and lines[-1] == "tunables None"
    assert "Usage" in proc.stdout  # the commands ran, in the caller's process


@pytest.mark.skipif(not wanted({}, platform.libc_ver(), sys.platform),
                    reason="needs Linux with glibc 2.35 or later")
def test_console_entry_reexecs_before_importing_the_commands():
    # `eicl` runs eicl_cli.__main__:main, as `python -m eicl_cli` does. The
    # process that is replaced imports only hugepages.py: Typer, Rich and the
    # commands (0.1 s) are imported once, after the exec.
    env = _untuned()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "eicl_cli", "--help"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert imported.count("eicl_cli.hugepages") == 2  # before and after the exec
    assert imported.count("eicl_cli.cli") == 1 and imported.count("typer") == 1
    assert proc.stdout.count("Usage") == 1
