"""The test Slurm cluster is real and behaves as a Slurm launcher needs.

Plain sbatch/sacct/scancel/scontrol first, then submitit (what `eicl sweep
--launcher slurm` will use) on the same cluster. Skipped (one line why)
without a cluster; see tests/slurm_cluster.py and docs/slurm-testing.md.
Each test prints what it measured (pytest -s shows it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, wait_until

pytestmark = pytest.mark.timeout(120)


def sbatch(cluster: SlurmCluster, script: str, *args: str, cwd: Path) -> str:
    path = cwd / f"job-{time.monotonic_ns()}.sh"
    path.write_text("#!/bin/bash\n" + script)
    out = cluster.run("sbatch", "--parsable", f"--chdir={cwd}", f"--output={cwd}/slurm-%A_%a.out", *args, str(path))
    return out.strip().split(";")[0]


def sacct(cluster: SlurmCluster, job: str, *more: str) -> list[dict[str, str]]:
    """One row per job (array tasks included), steps left out (-X)."""
    fields = "JobID,JobName,State,ExitCode"
    out = cluster.run("sacct", "-X", "-n", "-P", "-j", job, "-o", fields, *more)
    names = fields.split(",")
    return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line]


def states(cluster: SlurmCluster, job: str) -> list[str]:
    return [row["State"].split()[0] for row in sacct(cluster, job)]


def wait_state(cluster: SlurmCluster, job: str, state: str, timeout: float, n: int = 1) -> float:
    """Seconds until sacct shows n rows of job, all in state."""
    t0 = time.monotonic()
    wait_until(
        f"job {job} {state} (sacct: {states(cluster, job)})",
        lambda: (s := states(cluster, job)) and len(s) == n and all(x == state for x in s),
        timeout,
    )
    return time.monotonic() - t0


def restarts(cluster: SlurmCluster, job: str) -> int:
    """Slurm 22.05's sacct has no Restarts field: scontrol (while MinJobAge lasts)."""
    out = cluster.run("scontrol", "show", "job", job)
    return int(out.split("Restarts=")[1].split()[0])


def queued(cluster: SlurmCluster) -> set[str]:
    """This module's queued jobs: not the `eicl-*` job arrays that the
    launcher's tests (tests/test_sweep_slurm.py) may be running beside it on
    the other pytest worker."""
    lines = cluster.run("squeue", "-h", "-o", "%F %j").splitlines()
    return {job for job, _, name in (line.partition(" ") for line in lines)
            if not name.startswith("eicl-")}


@pytest.fixture(autouse=True)
def _cancel_leftovers(slurm_cluster, request):
    """A failing test leaves no job behind to hold the node's CPUs."""
    before = queued(slurm_cluster)
    yield
    if request.node.name != "test_cluster_is_real":  # it submits the USR1 job
        left = queued(slurm_cluster) - before
        if left:
            slurm_cluster.run("scancel", *sorted(left), check=False)


def report(name: str, seconds: float) -> None:
    print(f"\n[slurm timing] {name}: {seconds:.1f} s")


# The USR1-before-time-limit job is submitted first and checked last, so the
# half minute Slurm takes to send the signal overlaps the other tests.
@pytest.fixture(scope="module")
def usr1_job(slurm_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("usr1")
    # Without "B:", --signal goes to the job steps (srun), not the batch shell.
    script = f"""
echo start $(date +%s.%N) >> {d}/sig.txt
srun bash -c 'trap "echo usr1 \\$(date +%s.%N) >> {d}/sig.txt; exit 0" USR1; while :; do sleep 0.2; done'
"""
    job = sbatch(slurm_cluster, script, "--time=1", "--signal=USR1@50", cwd=d)
    return job, d / "sig.txt", time.monotonic()


def test_cluster_is_real(slurm_cluster, usr1_job):
    if slurm_cluster.started_here:
        report("cluster start (fixture)", slurm_cluster.start_s)
    line = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %c %T %P").split("\n")[0].split()
    assert line[0] == os.uname().nodename.split(".")[0]
    assert int(line[1]) == os.cpu_count()
    assert line[2] in ("idle", "mixed", "allocated")
    clusters = slurm_cluster.run("sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster,ControlHost")
    assert clusters.strip().split("|")[1], clusters  # slurmctld registered with slurmdbd


def test_array_of_four_completes(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    job = sbatch(slurm_cluster, f"echo task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID > {tmp_path}/out-$SLURM_ARRAY_TASK_ID\n",
                 "--array=0-3", cwd=tmp_path)
    wait_state(slurm_cluster, job, "COMPLETED", 30, n=4)
    report("sbatch --array=0-3 to all COMPLETED in sacct", time.monotonic() - t0)
    assert sorted(r["JobID"] for r in sacct(slurm_cluster, job)) == [f"{job}_{i}" for i in range(4)]
    for i in range(4):
        assert (tmp_path / f"out-{i}").read_text() == f"task {i} of {job}\n"
    assert len(list(tmp_path.glob(f"slurm-{job}_*.out"))) == 4


def test_scancel_shows_cancelled(slurm_cluster, tmp_path):
    job = sbatch(slurm_cluster, "sleep 300\n", cwd=tmp_path)
    wait_state(slurm_cluster, job, "RUNNING", 20)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", job)
    wait_state(slurm_cluster, job, "CANCELLED", 15)
    report("scancel to CANCELLED in sacct", time.monotonic() - t0)
    wait_until("job gone from squeue", lambda: not slurm_cluster.run("squeue", "-h", "-j", job, check=False).strip(), 15)


def test_exit_1_is_failed(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    job = sbatch(slurm_cluster, "exit 1\n", cwd=tmp_path)
    wait_state(slurm_cluster, job, "FAILED", 20)
    report("exit 1 to FAILED in sacct", time.monotonic() - t0)
    assert sacct(slurm_cluster, job)[0]["ExitCode"] == "1:0"


def test_requeue_runs_again(slurm_cluster, tmp_path):
    log = tmp_path / "runs.txt"
    job = sbatch(slurm_cluster, f"echo run $SLURM_RESTART_COUNT >> {log}\nsleep 300\n", cwd=tmp_path)
    wait_until("first run", lambda: log.exists() and log.read_text(), 20)
    t0 = time.monotonic()
    slurm_cluster.run("scontrol", "requeue", job)
    wait_until("second run", lambda: len(log.read_text().splitlines()) == 2, 40)
    report("scontrol requeue to running again (cred_expire=10)", time.monotonic() - t0)
    assert log.read_text() == "run\nrun 1\n"  # SLURM_RESTART_COUNT is unset on the first run
    assert restarts(slurm_cluster, job) == 1
    # --duplicates keeps the requeued record beside the running one.
    every = [r["State"] for r in sacct(slurm_cluster, job, "--duplicates")]
    assert every == ["REQUEUED", "RUNNING"], every
    slurm_cluster.run("scancel", job)
    wait_state(slurm_cluster, job, "CANCELLED", 15)


# ---------------------------------------------------------------- submitit

try:
    import submitit
except ImportError:  # not a dependency yet: the launcher will bring it
    submitit = None
needs_submitit = pytest.mark.skipif(submitit is None, reason="submitit is not installed")


def _square(x: int) -> int:
    return x * x


def _sleep_then(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


class _Resumable(submitit.helpers.Checkpointable if submitit else object):
    """Counts its starts in a file; waits to be preempted on the first."""

    def __call__(self, marker: str) -> int:
        path = Path(marker)
        with path.open("a") as f:
            f.write(f"start {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        starts = len(path.read_text().splitlines())
        if starts == 1:
            time.sleep(120)
        return starts


@pytest.fixture(scope="module", autouse=True)
def _pickle_by_value():
    # The job's Python cannot import this test module: send these by value.
    # (eicl's own functions are importable from the venv: no need there.)
    if submitit is None:
        yield
        return
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def executor(folder: Path, **params):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1, **params)
    return ex


@needs_submitit
def test_submitit_array(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    jobs = executor(tmp_path / "%j", name="squares").map_array(_square, [1, 2, 3])
    assert [j.result() for j in jobs] == [1, 4, 9]
    report("submitit map_array of 3 to results", time.monotonic() - t0)
    main = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{main}_{i}" for i in range(3)]
    # job.state is the watcher's cached sacct (it was still PENDING here);
    # get_info() asks sacct now, but sacct (slurmdbd) may lag the result
    # files by a moment and show nothing ({}) or an older state.
    wait_until(
        "sacct: COMPLETED",
        lambda: {j.get_info().get("State") for j in jobs} == {"COMPLETED"},
        15,
        every=0.5,
    )
    # A folder with %j: one per array task, "<array>_<task>", logs named
    # "<array>_<task>_<rank>_log.out"; the sbatch script goes in "<array>/".
    assert jobs[0].paths.stdout == tmp_path / f"{main}_0" / f"{main}_0_0_log.out"
    assert (tmp_path / main / f"{main}_submission.sh").exists()
    assert jobs[0].paths.stdout.exists()
    assert [r["JobName"] for r in sacct(slurm_cluster, main)] == ["squares"] * 3


@needs_submitit
def test_submitit_cancel(slurm_cluster, tmp_path):
    job = executor(tmp_path).submit(_sleep_then, 300)
    wait_until("RUNNING", lambda: job.state == "RUNNING", 30, every=0.5)
    t0 = time.monotonic()
    job.cancel()
    wait_until(f"CANCELLED (state {job.state})", lambda: job.state.startswith("CANCELLED"), 30, every=0.5)
    report("submitit job.cancel() to job.state CANCELLED", time.monotonic() - t0)
    assert job.done()
    # result() of a cancelled job waits _results_timeout_s (15 s by default)
    # for a result file that never comes, then raises.
    job._results_timeout_s = 2
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="has not produced any output"):
        job.result()


@needs_submitit
def test_submitit_checkpoint_and_requeue(slurm_cluster, tmp_path):
    marker = tmp_path / "starts.txt"
    job = executor(tmp_path / "log").submit(_Resumable(), str(marker))
    wait_until("first start", lambda: marker.exists() and marker.read_text(), 30)
    t0 = time.monotonic()
    job._interrupt()  # as Slurm preempting: SIGTERM (ignored), then USR2 -> checkpoint, scontrol requeue
    assert job.result() == 2
    report("submitit preempt (USR2) to checkpointed, requeued and finished", time.monotonic() - t0)
    assert marker.read_text() == "start 0\nstart 1\n"
    assert restarts(slurm_cluster, job.job_id) == 1
    log = job.stdout() or ""  # both runs, appended
    assert "Calling checkpoint method" in log and f"Requeued job {job.job_id}" in log, log
    # submitit calls any signal in the first 80% of the time (and in all of a
    # time under 10 min) a time-out: it counts against max_num_timeout.
    assert "this job is timed-out" in (job.stderr() or "")


def test_usr1_before_time_limit(slurm_cluster, usr1_job):
    job, sig, submitted = usr1_job
    wait_state(slurm_cluster, job, "COMPLETED", 75)
    lines = dict(line.split() for line in sig.read_text().splitlines())
    delay = float(lines["usr1"]) - float(lines["start"])
    report("--time=1 --signal=USR1@50: USR1 after start (asked: ~10 s)", delay)
    assert delay < 60  # before the time limit: the step caught it and exited 0
