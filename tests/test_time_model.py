"""benchmarks/gpu/time_model.py: the per-kernel step time, the fit of its
constants to measured steps, and the committed H100 calibration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu import time_model

_ROOT = Path(__file__).resolve().parents[1]


def _program(rows: list[tuple[str, float, float, float]], label: str = "p"):
    kind, n, b, f = zip(*rows)
    return time_model.Program(label, np.array(n, float), np.array(b, float), np.array(f, float),
                              np.array(["triton" in k for k in kind]), kind)


def test_each_kernel_takes_its_launch_bytes_or_flops_whichever_is_longest():
    p = _program([("fusion:kLoop", 10, 1e3, 0),            # 10 launches of tiny work
                  ("fusion:kInput", 1, 4e9, 0),             # 2 ms of bytes at 2 TB/s
                  ("cublas", 2, 1e6, 3e10),                 # 1.5 ms of FLOPs each at 20 TFLOPS
                  ("__gpu$xla.gpu.triton", 1, 1e6, 1e11)])  # 1 ms at 100 TFLOPS
    launch, bw, rate, tc = 3e-6, 2e12, 20e12, 100e12
    at_most = 10 * 3e-6 + 2e-3 + 2 * 1.5e-3 + 1e-3
    assert time_model.step_seconds(p, "max", launch, bw, rate, tc) == pytest.approx(at_most)
    assert time_model.step_seconds(p, "sum", launch, bw, rate, tc) == pytest.approx(
        at_most + 4 * launch)
    # A grid of constants at once: one time per point.
    grid = time_model.step_seconds(p, "max", np.array([3e-6, 1e-6]), np.array([2e12, 2e12]),
                                   np.array([20e12, 20e12]), tc)
    assert grid.shape == (2,) and grid[0] == pytest.approx(at_most)
    assert grid[1] == pytest.approx(at_most - 10 * 2e-6)


def test_the_fit_finds_the_constants_a_device_ran_at():
    launch = float(time_model.LAUNCH_US[10])
    bw = float(time_model.BANDWIDTH_TBS[20])
    rate = float(time_model.RATE_TFLOPS[6])
    # Programs that each lean on one constant, and mixes.
    programs = [_program([("fusion:kLoop", 900, 1e4, 0)]),
                _program([("fusion:kLoop", 20, 5e9, 0)]),
                _program([("cublas", 3, 1e6, 2e11)]),
                _program([("fusion:kLoop", 300, 1e4, 0), ("fusion:kInput", 5, 2e9, 0),
                          ("cublas", 4, 1e7, 5e10)]),
                _program([("fusion:kLoop", 50, 1e8, 0), ("cublas", 1, 1e9, 1e12)])]
    measured = [float(time_model.step_seconds(p, "max", launch * 1e-6, bw * 1e12, rate * 1e12,
                                              1e15)) for p in programs]
    best = time_model.fits(programs, measured, 1e15)[0]
    assert best.error < 1e-9
    assert (best.form, best.launch_us, best.bandwidth_tbs, best.rate_tflops) == \
        ("max", launch, bw, rate)


def test_the_committed_h100_calibration_fits_its_measurements():
    device, programs, measured, names = time_model.load_calibration(time_model.CALIBRATION)
    assert device.startswith("NVIDIA H100") and len(programs) == len(measured) >= 5
    best = time_model.fits(programs, measured, 200e12)[0]
    assert best.error < 0.08
    for p, m, name in zip(programs, measured, names):
        assert best.seconds(p, 200e12) == pytest.approx(m, rel=0.1), name
    # Eight stacked paper runs against one: the measured ratio
    # (benchmarks/gpu/README.md) within the model's error.
    one, eight = programs[0], programs[1]
    assert 4.0 < best.seconds(eight, 200e12) / best.seconds(one, 200e12) < 5.0


def _run(*args: str) -> subprocess.CompletedProcess:
    """The command line as benchmarks/gpu/README.md documents it, from the
    repository root (the program files are given by absolute path)."""
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu.time_model", *args],
                          capture_output=True, text=True, cwd=_ROOT, timeout=300)


def test_pairs_show_each_stacked_program_against_its_one_run():
    calibration = json.loads(time_model.CALIBRATION.read_text())["measured"]
    one, eight = (str(time_model.CALIBRATION.parent / e["program"]) for e in calibration[:2])
    done = _run("--pairs", "--breakdown", one, eight)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.rstrip().endswith("(h100)")]
    assert len(rows) == 2 and rows[0].split()[2] == "1.00-1.00"
    low, high = (float(x) for x in rows[1].split()[2].split("-"))
    assert 4.0 < low <= high < 5.0
    assert "cudnn, FLOPs" in done.stdout  # the breakdown of the stacked program


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path):
    odd = _run("--pairs", str(time_model.CALIBRATION.parent / "5f6bf56_paper.json"))
    assert odd.returncode == 2
    assert odd.stderr.strip().splitlines()[-1].endswith("--pairs takes programs two by two; got 1")
    bare = tmp_path / "bare.json"
    bare.write_text('{"launches": 1, "bytes": 1, "by_source": {}}')
    done = _run(str(bare))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        f"{bare}: no kernel list (save it with this checkout's gpu_program.py --save)")
