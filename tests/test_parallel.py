"""Data parallelism: two (forced) CPU devices follow the one-device run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eicl_cli import parallel, runs
from eicl_cli.errors import EiclError
from train_support import TINY, eicl, tensors

# A one-group ResNet, so batch norm's statistics must be those of the global
# batch for the two runs to agree; dropout and noise exercise the step keys.
OVERRIDES = ["embedding.example_encoder=\"resnet\"", "embedding.resnet_blocks_per_group=[1]",
             "embedding.resnet_channels_per_group=[]", "sequences.noise_scale=0.1",
             "transformer.dropout_prob=0.1", "run.steps=6", "run.log_every=1",
             "run.eval_every=6", "run.checkpoint_every=6", "train.batch_size=8"]


def _train(data_dir: Path, out: Path, devices: int) -> list[float]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "EICL_NO_COMPILE_CACHE": "1"}
    proc = eicl("train", "--config", str(TINY), "--out", str(out), *sets,
                "--set", f'data.data_dir="{data_dir}"', data_dir=data_dir, env=env)
    assert proc.returncode == 0, proc.stderr
    return [r["loss"] for r in runs.read_metrics(out, kind="train")]


@pytest.mark.slow  # two fresh processes, each compiling the step
def test_two_devices_follow_the_one_device_trajectory(data_dir: Path, tmp_path: Path):
    one = _train(data_dir, tmp_path / "one", 1)
    two = _train(data_dir, tmp_path / "two", 2)
    assert len(one) == 6
    np.testing.assert_allclose(two, one, rtol=2e-5, atol=2e-6)
    a = tensors(runs.checkpoint_path(tmp_path / "one", 6))
    b = tensors(runs.checkpoint_path(tmp_path / "two", 6))
    assert a.keys() == b.keys()
    # Batch norm's running statistics: those of the global batch on both.
    for name in [n for n in a if n.startswith("state.")]:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # Parameters: Adam turns gradients that are zero up to rounding (e.g. the
    # attention keys' bias) into full-size steps, so compare at the step size.
    for name in [n for n in a if n.startswith("params.")]:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3, atol=5e-4, err_msg=name)


def test_batch_must_split_evenly_over_devices():
    import jax
    device = jax.devices()[0]
    with pytest.raises(EiclError, match="divisible by the 3 devices"):
        parallel.Placement.for_batch(32, [device] * 3)
    assert parallel.Placement.for_batch(32, [device]).mesh is None


def test_multi_host_flags_come_together():
    with pytest.raises(EiclError, match="together"):
        parallel.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(EiclError, match="process-id 2"):
        parallel.initialize_distributed("localhost:1234", 2, 2)
