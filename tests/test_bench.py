"""`eicl bench`: the figures it reports, plain and stacked, on a tiny config."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest

from eicl_cli.hugepages import TUNABLE, wanted
from train_support import TINY, eicl

FIELDS = ("device", "generator_sequences_per_s", "compile_s", "train_steps_per_s",
          "train_sequences_per_s", "eval_sequences_per_s", "peak_host_rss_gb")


def test_bench_json_reports_every_figure_plain_and_stacked(data_dir: Path):
    flags = "--xla_cpu_enable_fast_math=false"
    proc = eicl("bench", "--config", str(TINY), "--config", str(TINY), "--steps", "3",
                "--stack", "2", "--json", "--set", f'data.data_dir="{data_dir}"',
                data_dir=data_dir, env={"XLA_FLAGS": flags})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for r in rows:
        assert r["stack"] == 2 and r["train_steps"] == 3 and r["config"] == "tiny"
        assert r["set"] == [f'data.data_dir="{data_dir}"'] and r["xla_flags"] == flags
        # `python -m eicl_cli` re-executed itself for huge pages (hugepages.py).
        assert r["glibc_tunables"] == (TUNABLE if wanted(os.environ, platform.libc_ver(),
                                                         sys.platform)
                                       else os.environ.get("GLIBC_TUNABLES") or None)
        assert r["jax_version"].count(".") >= 2
        for f in FIELDS:
            assert r[f] is not None, f
        assert r["generator_sequences_per_s"] > 1000
        assert r["train_sequences_per_s"] == pytest.approx(
            r["train_steps_per_s"] * 2 * r["batch_size"], rel=0.01)
        assert r["compile_s"] >= 0 and r["eval_sequences_per_s"] > 0


def test_bench_table_and_bad_arguments(data_dir: Path):
    proc = eicl("bench", "--config", str(TINY), "--steps", "2", "--set",
                f'data.data_dir="{data_dir}"', data_dir=data_dir,
                env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert proc.returncode == 0, proc.stderr
    assert "train steps/s" in proc.stdout and "generator sequences/s" in proc.stdout
    assert "with --set data.data_dir=" in " ".join(proc.stdout.split())
    assert "with XLA_FLAGS=--xla_cpu_enable_fast_math=false" in " ".join(proc.stdout.split())
    bad = eicl("bench", "--config", str(TINY), "--stack", "0", data_dir=data_dir)
    assert bad.returncode == 2 and "--stack 0" in bad.stderr
