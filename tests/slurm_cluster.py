"""A real single-node Slurm cluster for the tests (see docs/slurm-testing.md).

`slurm_cluster` is a session-scoped fixture. Where `SLURM_CONF` is already
set (`.ci/run` starts the cluster before pytest, and exports
`EICL_REQUIRE_SLURM=1`), it checks that cluster and uses it. Otherwise it
installs the packages when missing and starts a cluster of its own with
`.ci/slurm.sh start DIR` in a fresh folder under /tmp, and stops it (every
daemon by its pid) at the end of the session.

When Slurm cannot be had (not root, no apt-get, a daemon that fails) the
tests that use it skip with a one-line reason; with `EICL_REQUIRE_SLURM=1`
they fail instead, so that CI cannot pass without the cluster. Set
`EICL_SLURM=0` to skip them at once without trying.

To use it from a test module: `from slurm_cluster import slurm_cluster` (or
import it in conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "slurm.sh"


@dataclass
class SlurmCluster:
    conf: Path  # the slurm.conf that SLURM_CONF names
    started_here: bool  # False: started by .ci/run (or whoever set SLURM_CONF)
    dir: Path | None = None  # the cluster's folder when started here
    start_s: float = 0.0  # seconds `.ci/slurm.sh start` took (0 when not started here)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """A Slurm command against this cluster; its stdout."""
        p = subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
        return p.stdout


def _unavailable(reason: str) -> None:
    if os.environ.get("EICL_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm cluster required (EICL_REQUIRE_SLURM=1) but {reason}", pytrace=False)
    pytest.skip(f"no Slurm cluster: {reason}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _check(conf: Path) -> None:
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        p = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"sinfo with SLURM_CONF={conf}: {e}")
    if p.returncode != 0 or not p.stdout.strip():
        _unavailable(f"sinfo with SLURM_CONF={conf}: {_last_line(p.stderr or p.stdout)}")


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("EICL_SLURM") == "0":
        pytest.skip("no Slurm cluster: EICL_SLURM=0")
    given = os.environ.get("SLURM_CONF")
    if given:
        conf = Path(given)
        if not conf.is_file():
            _unavailable(f"SLURM_CONF={given} does not exist")
        _check(conf)
        yield SlurmCluster(conf=conf, started_here=False)
        return
    if os.geteuid() != 0:
        _unavailable("not root (the test cluster's slurmd and apt-get need root; see docs/slurm-testing.md)")
    p = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        _unavailable(_last_line(p.stderr or p.stdout))
    # Under /tmp, not pytest's basetemp: the slurm and munge users must reach it.
    d = Path(tempfile.mkdtemp(prefix="eicl-slurm-", dir="/tmp"))
    t0 = time.monotonic()
    p = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=180)
    start_s = time.monotonic() - t0
    if p.returncode != 0:  # slurm.sh stopped what it had started
        _unavailable(_last_line(p.stderr))
    conf = d / "etc" / "slurm.conf"
    os.environ["SLURM_CONF"] = str(conf)  # for submitit and any subprocess
    try:
        yield SlurmCluster(conf=conf, started_here=True, dir=d, start_s=start_s)
    finally:
        del os.environ["SLURM_CONF"]
        p = subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=180)
        if p.returncode == 0:
            shutil.rmtree(d, ignore_errors=True)
        else:  # keep the logs
            print(f"slurm_cluster: stop failed (logs kept in {d}): {_last_line(p.stderr)}")


def wait_until(what: str, predicate, timeout: float, every: float = 0.2):
    """predicate()'s first true value, polled every `every` s; an
    AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)
