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


def _args(data_dir: Path, out: Path) -> list[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return ["train", "--config", str(TINY), "--out", str(out), *sets,
            "--set", f'data.data_dir="{data_dir}"']


def _env(devices: int) -> dict[str, str]:
    import os
    # Keep inherited flags (e.g. --xla_cpu_max_isa, to emulate another CPU).
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {"XLA_FLAGS": flags.strip(), "EICL_COMPILE_CACHE": "off"}


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in runs.read_metrics(run, kind="train")]


def _train(data_dir: Path, out: Path, devices: int) -> list[float]:
    proc = eicl(*_args(data_dir, out), data_dir=data_dir, env=_env(devices))
    assert proc.returncode == 0, proc.stderr
    return _losses(out)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(data_dir: Path, args: list[str], n: int = 2,
               ok: bool = True) -> list[tuple[int, str]]:
    """`eicl ARGS` as n processes of one multi-host run (one CPU device each,
    on this machine); returns each one's exit status and output."""
    import os
    import subprocess
    import sys
    port = _free_port()
    env = {**os.environ, "EICL_DATA_DIR": str(data_dir), **_env(1)}
    procs = [subprocess.Popen([sys.executable, "-m", "eicl_cli", *args,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                               "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if ok:
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-3000:]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


@pytest.fixture(scope="module")
def one_device(data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert len(_train(data_dir, out, 1)) == 6
    return out


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a = tensors(runs.checkpoint_path(a_dir, 6))
    b = tensors(runs.checkpoint_path(b_dir, 6))
    assert a.keys() == b.keys()
    # Batch norm's running statistics: those of the global batch on both, but
    # means of activations of parameters that Adam moved apart (below), so
    # they differ as much as the parameters do (as in test_stack).
    for name in [n for n in a if n.startswith("state.")]:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3, atol=1e-5, err_msg=name)
    # Parameters: Adam turns gradients that are zero up to rounding (e.g. the
    # attention keys' bias) or nearly so into full-size steps of either sign,
    # so compare at the distance such a coordinate can go in 6 steps: the sum
    # of the learning rates, 1e-3 * (1 + ... + 6) / 20 (warm-up of 20 steps).
    for name in [n for n in a if n.startswith("params.")]:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3, atol=1.05e-3, err_msg=name)


@pytest.mark.slow  # a fresh process compiling the step
def test_two_devices_follow_the_one_device_trajectory(one_device: Path, data_dir: Path,
                                                      tmp_path: Path):
    two = _train(data_dir, tmp_path / "two", 2)
    # Two devices are another program (per-device sums joined by an
    # all-reduce, reassociated per CPU by XLA), and Adam turns that rounding
    # into parameter moves up to the step size: losses agree to 1e-3.
    np.testing.assert_allclose(two, _losses(one_device), rtol=1e-3, atol=1e-5)
    _assert_same_run(one_device, tmp_path / "two")


@pytest.mark.slow  # a fresh process compiling the step
def test_two_devices_with_three_steps_per_call_follow_the_one_device_run(
        one_device: Path, data_dir: Path, tmp_path: Path):
    # Each call's 3 batches are split over the devices along the batch axis.
    out = tmp_path / "two_k3"
    proc = eicl(*_args(data_dir, out), "--set", "train.steps_per_call=3",
                "--set", "run.log_every=3", data_dir=data_dir, env=_env(2))
    assert proc.returncode == 0, proc.stderr
    one = _losses(one_device)  # logged every step
    # Another program (scanned, on two devices), amplified by Adam: 1e-3.
    np.testing.assert_allclose(_losses(out), [np.mean(one[:3]), np.mean(one[3:])],
                               rtol=1e-3, atol=1e-5)
    _assert_same_run(one_device, out)


@pytest.mark.slow  # two processes, then two more to resume
def test_two_processes_follow_the_one_device_trajectory_and_resume(one_device: Path,
                                                                   data_dir: Path,
                                                                   tmp_path: Path):
    """Two processes joined by jax.distributed (as two hosts would be, here
    one CPU device each, collectives over Gloo) train one run: process 0
    writes the folder, both compute. Then the two resume it from step 3."""
    run = tmp_path / "hosts"
    args = _args(data_dir, run)
    args[args.index("run.checkpoint_every=6")] = "run.checkpoint_every=3"
    outs = [out for _, out in _processes(data_dir, args)]
    assert "run folder" in outs[0] and "run folder" not in outs[1]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.toml",
                                                     "environment.jsonl", "metrics.jsonl"]
    env = runs.read_environment(run)
    assert len(env) == 1 and env[0]["processes"] == 2 and env[0]["step"] == 0
    # Two processes: the two-device program's rounding, amplified by Adam.
    np.testing.assert_allclose(_losses(run), _losses(one_device), rtol=1e-3, atol=1e-5)
    _assert_same_run(one_device, run)
    evals = [r for r in runs.read_metrics(run) if r["kind"] == "eval"]
    want = [r for r in runs.read_metrics(one_device) if r["kind"] == "eval"]
    assert [(r["mode"], r["accuracy_query"]) for r in evals] == \
        [(r["mode"], r["accuracy_query"]) for r in want]

    finished = tensors(runs.checkpoint_path(run, 6))
    runs.checkpoint_path(run, 6).unlink()  # back to step 3's checkpoint
    _processes(data_dir, ["train", "--resume", str(run)])
    assert [e["step"] for e in runs.read_environment(run)] == [0, 3]  # process 0's records only
    assert [r["step"] for r in runs.read_metrics(run, kind="train")] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(_losses(run), _losses(one_device), rtol=1e-3, atol=1e-5)
    again = tensors(runs.checkpoint_path(run, 6))
    for name in finished:
        np.testing.assert_array_equal(again[name], finished[name], err_msg=name)


@pytest.mark.slow
def test_multi_host_needs_a_named_run_folder(data_dir: Path, tmp_path: Path):
    """A default folder name holds the start time, which the hosts would not
    agree on: refused on every process, and nothing is written."""
    args = _args(data_dir, tmp_path / "x")
    args = args[:args.index("--out")] + args[args.index("--out") + 2:]
    args += ["--set", f'run.out_dir="{tmp_path / "runs"}"']
    for code, out in _processes(data_dir, args, ok=False):
        assert code == 2, out[-3000:]
        assert "multi-host training needs --out RUN" in out
    assert not (tmp_path / "runs").exists()


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
    for bad in ("localhost", ":1234", "node1:port", "node1:70000"):
        with pytest.raises(EiclError, match=f"--coordinator '{bad}' must be HOST:PORT"):
            parallel.initialize_distributed(bad, 2, 0)


def test_distributed_outside_a_cluster_is_one_line(data_dir: Path, tmp_path: Path):
    """In a fresh process, as JAX must not have started before it joins."""
    import os
    env = {v: "" for v in os.environ if v.startswith(("SLURM_", "OMPI_", "TPU_"))}
    proc = eicl(*_args(data_dir, tmp_path / "run"), "--distributed", data_dir=data_dir,
                env={**env, **_env(1)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: could not join the multi-host run from the cluster environment"), lines
    assert not (tmp_path / "run").exists()


def test_stem_kernels_are_refused_on_a_mesh_of_gpus():
    from eicl_cli import config
    from eicl_cli.training.preflight import check_stem_impl
    pallas = config.from_dict(config.apply_overrides({}, ['embedding.stem_impl="pallas"']))
    with pytest.raises(EiclError, match="stem_impl = 'pallas' runs on one GPU per run.*2 dev"):
        check_stem_impl(pallas, 2, "gpu")
    check_stem_impl(pallas, 1, "gpu")  # one GPU per run
    check_stem_impl(pallas, 2, "cpu")  # a CPU runs the blocked stem
    check_stem_impl(config.from_dict({}), 2, "gpu")


@pytest.mark.slow  # a fresh process
def test_a_batch_the_devices_cannot_split_is_refused_before_a_run_folder(data_dir: Path,
                                                                        tmp_path: Path):
    proc = eicl(*_args(data_dir, tmp_path / "run"), "--set", "train.batch_size=7",
                data_dir=data_dir, env=_env(2))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: train.batch_size = 7 must be divisible by the 2 devices it is "
                     "split over"], lines
    assert not (tmp_path / "run").exists()
