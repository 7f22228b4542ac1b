"""Large allocations on transparent huge pages: `eicl` re-executes itself
once, at start, with glibc's malloc told to ask for them.

XLA's CPU runtime allocates each step's temporary buffers afresh (the paper
config's step: one 510 MB block) and frees them after it. glibc serves a
block that large with its own mmap and returns it with munmap, so every step
the kernel faults in and zeroes 130,000 new 4 KiB pages (system time that
shows in every step), and the step's passes over those
buffers miss the TLB on 4 KiB pages. With the tunable glibc.malloc.hugetlb=1
(glibc 2.35 and later) malloc marks such blocks MADV_HUGEPAGE, so where the
kernel's transparent huge pages are in `madvise` mode (the common default)
they come as 2 MiB pages: 255 faults for the block (docs/performance.md has
the measured steps/s).

glibc reads its tunables only when a process starts, hence the re-exec. A
GLIBC_TUNABLES already in the environment, even an empty one, is the user's
choice and is left as it is (`GLIBC_TUNABLES= eicl ...` turns this off).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
MIN_GLIBC = (2, 35)


def wanted(environ: Mapping[str, str], libc: tuple[str, str], system: str) -> bool:
    """Whether a process with this environment, C library (as
    platform.libc_ver() names it) and sys.platform should re-execute with
    TUNABLE: Linux with glibc 2.35 or later, and no GLIBC_TUNABLES set."""
    name, version = libc
    if system != "linux" or name != "glibc" or "GLIBC_TUNABLES" in environ:
        return False
    try:
        return tuple(int(p) for p in version.split(".")[:2]) >= MIN_GLIBC
    except ValueError:
        return False


def reexec_with_huge_pages() -> None:
    """Replace this process with the same command line (the interpreter and
    its options, the script or -m module, the arguments) run with TUNABLE in
    GLIBC_TUNABLES, if `wanted`; otherwise, or if the exec fails, return."""
    if not wanted(os.environ, platform.libc_ver(), sys.platform):
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLE
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        # Run on without huge pages rather than not at all; the variable
        # stays set so that no child process tries again.
        pass
