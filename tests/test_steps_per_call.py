"""train.steps_per_call: several training steps in one device call follow
the one-step-per-call trajectory, never cross a log, evaluation or
checkpoint step, and resume exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eicl_cli import runs
from eicl_cli import training
from eicl_cli.errors import EiclError
from eicl_cli.training.flat_step import call_plan, steps_per_call
from train_support import new_run_dirs, tensors, tiny, train_run

# Batch norm (one-group ResNet), dropout and pixel noise: the state and the
# per-step keys go through the device loop too.
MODEL = ['embedding.example_encoder="resnet"', "embedding.resnet_blocks_per_group=[1]",
         "embedding.resnet_channels_per_group=[]", "transformer.dropout_prob=0.1",
         "sequences.noise_scale=0.1", "train.batch_size=8", "run.log_every=4",
         "run.eval_every=12", "run.checkpoint_every=6", "eval.train_sequences=32",
         "eval.batch_size=32"]
# Plain SGD for the comparison: Adam divides each gradient by its own scale,
# so it turns rounding-level gradients (a key bias's, zero in exact arithmetic)
# into full-size steps, and two roundings of one update would drift apart.
SGD = ['optimizer.name="sgd"', "optimizer.max_lr=0.05", "optimizer.warmup_steps=0",
       'optimizer.schedule="constant"']


@pytest.mark.parametrize("start,total,per_call,intervals", [
    (0, 100, 8, (10, 50, 30)), (7, 61, 4, (5,)), (0, 40, 10, (10, 20)), (3, 4, 16, (100,)),
    (0, 25, 1, (4,)), (0, 30, 7, ())])
def test_call_plan_covers_every_step_once_and_stops_at_every_interval(start, total, per_call,
                                                                      intervals):
    sizes = list(call_plan(start, total, per_call, intervals))
    assert sum(sizes) == total - start and set(sizes) <= {1, per_call}
    ends = set(np.cumsum(sizes) + start)
    for i in intervals:  # every multiple of an interval is the end of a call
        assert set(range((start // i + 1) * i, total, i)) <= ends
    if intervals and all(i % per_call == 0 for i in intervals) and start % per_call == 0 \
            and total % per_call == 0:
        assert set(sizes) == {per_call}  # aligned: no single steps at all


def test_call_plan_uses_whole_calls_between_boundaries():
    assert list(call_plan(0, 12, 3, (4,))) == [3, 1, 3, 1, 3, 1]
    assert list(call_plan(0, 10, 4, ())) == [4, 4, 1, 1]


def test_steps_per_call_must_not_be_negative(data_dir: Path):
    with pytest.raises(EiclError, match=r"train.steps_per_call = -1 must be >= 0"):
        tiny(data_dir, "train.steps_per_call=-1")


def test_steps_per_call_zero_is_chosen_for_the_backend():
    assert steps_per_call(0, "cpu") == 1
    assert steps_per_call(0, "gpu") == 10 and steps_per_call(0, "tpu") == 10
    assert steps_per_call(3, "cpu") == 3 and steps_per_call(1, "gpu") == 1
    assert steps_per_call(0) == 1  # the tests run on a CPU


def test_bench_of_the_default_reports_the_steps_per_call_it_ran(data_dir: Path):
    from eicl_cli import bench
    cfg = tiny(data_dir)
    assert cfg.train.steps_per_call == 0
    out = bench.bench_config(cfg, steps=2, generator_seconds=0.05, eval_sequences=64)
    assert out["steps_per_call"] == 1 and out["train_steps"] == 2


@pytest.mark.slow  # compiles the ResNet step three ways
def test_steps_per_call_follows_one_step_per_call_and_resumes_exactly(data_dir: Path,
                                                                      tmp_path: Path):
    one = train_run(tiny(data_dir, *MODEL, *SGD, "run.steps=12"), tmp_path / "one")
    # 3 steps per call: calls of 3, 1, 3, 1, ... (log every 4, checkpoint every 6)
    three = tiny(data_dir, *MODEL, *SGD, "run.steps=12", "train.steps_per_call=3")
    whole = train_run(three, tmp_path / "whole")
    assert one.step == whole.step == 12
    m1, m3 = (runs.read_metrics(tmp_path / r, kind="train") for r in ("one", "whole"))
    assert [r["step"] for r in m3] == [r["step"] for r in m1] == [4, 8, 12]
    for a, b in zip(m1, m3):
        assert b["lr"] == a["lr"]
        for k in ("loss", "accuracy_query"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a, b)
    assert [s for s, _ in runs.list_checkpoints(tmp_path / "whole")] == [6, 12]
    # The loop's body may round differently from the lone step (another
    # program), on any CPU. Plain SGD keeps such differences near float32's
    # rounding for a few steps; later the run is chaotic at the rounding
    # level (gradients pass through the max pool's choice in each window, and
    # two roundings can decide a near-tie apart), so the bound grows with the
    # steps while staying far below what one step more or less would move.
    for step, atol in ((6, 1e-6), (12, 2e-4)):
        c1 = tensors(runs.checkpoint_path(tmp_path / "one", step))
        c3 = tensors(runs.checkpoint_path(tmp_path / "whole", step))
        assert c1.keys() == c3.keys() and any(k.startswith("state.") for k in c1)
        for name in c1:
            np.testing.assert_allclose(c3[name], c1[name], rtol=1e-4, atol=atol,
                                       err_msg=f"{name} at step {step}")

    # Stopped at step 6 and resumed: bit for bit the uninterrupted run.
    half = tiny(data_dir, *MODEL, *SGD, "run.steps=6", "train.steps_per_call=3")
    assert train_run(half, tmp_path / "split").step == 6
    assert train_run(three, tmp_path / "split", resume=True).step == 12
    split = tensors(runs.checkpoint_path(tmp_path / "split", 12))
    whole = tensors(runs.checkpoint_path(tmp_path / "whole", 12))
    for name in whole:
        assert np.array_equal(split[name], whole[name]), name
    # Its log intervals end at 4, 6 (the first leg's end), 8 and 12; those of
    # whole steps (4 and 12) hold the same numbers as the uninterrupted run's.
    strip = ("time", "steps_per_s", "sequences_per_s")
    logged = {r["step"]: {k: v for k, v in r.items() if k not in strip}
              for r in runs.read_metrics(tmp_path / "split", kind="train")}
    assert sorted(logged) == [4, 6, 8, 12]
    for r in m3:
        if r["step"] in (4, 12):
            assert logged[r["step"]] == {k: v for k, v in r.items() if k not in strip}


def test_stacked_runs_with_steps_per_call_follow_one_step_per_call(data_dir: Path,
                                                                    tmp_path: Path):
    # The tiny linear model: cheap to compile, and the stacked loop is the same code.
    points = [("sequences.p_bursty=0.0", "run.seed=0"), ("sequences.p_bursty=1.0", "run.seed=1")]
    ends = {}
    for per_call in (1, 4):
        cfgs = [training.resolved_config(tiny(
            data_dir, *p, *SGD, "run.steps=10", "run.log_every=5", "run.eval_every=10",
            "run.checkpoint_every=10", f"train.steps_per_call={per_call}")) for p in points]
        dirs = new_run_dirs(cfgs, tmp_path, f"k{per_call}_")
        assert training.train_runs(cfgs, dirs, live=False).step == 10
        ends[per_call] = [(runs.read_metrics(d, kind="train"), tensors(runs.checkpoint_path(d, 10)))
                          for d in dirs]
    for (m1, c1), (m4, c4) in zip(ends[1], ends[4]):
        assert [r["step"] for r in m4] == [r["step"] for r in m1] == [5, 10]
        np.testing.assert_allclose([r["loss"] for r in m4], [r["loss"] for r in m1],
                                   rtol=1e-4, atol=1e-5)
        for name in c1:
            np.testing.assert_allclose(c4[name], c1[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert ends[1][0][0][-1]["loss"] != ends[1][1][0][-1]["loss"]  # two different runs


def test_bench_measures_whole_calls(data_dir: Path):
    from eicl_cli import bench
    cfg = tiny(data_dir, "train.steps_per_call=4")
    out = bench.bench_config(cfg, steps=6, generator_seconds=0.05, eval_sequences=64)
    assert out["steps_per_call"] == 4 and out["train_steps"] == 8  # rounded up to whole calls
    assert out["train_steps_per_s"] > 0 and out["compile_s"] >= 0


def test_first_call_is_the_call_the_bench_runs(data_dir: Path):
    """benchmarks/gpu/gpu_program.py compiles Trainer.first_call for a GPU; on the
    CPU it must compute what the training loop computes for the same steps."""
    import jax
    from eicl_cli import bench
    from eicl_cli.data.dataset import load_dataset
    from eicl_cli.inputs import device_data
    from eicl_cli.training.loop import run_steps

    cfg = tiny(data_dir, "train.steps_per_call=3")
    dataset = load_dataset(cfg)

    def trainer():
        return bench.bench_trainer(cfg, dataset, device_data(dataset, cfg))

    ran = trainer()
    run_steps(ran, 0, 3)
    fn, args = trainer().first_call(3)
    leaves, sums = fn(*args)
    assert len(leaves) == len(ran.carry.leaves)
    for got, want in zip(leaves, ran.carry.leaves):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree_util.tree_leaves(sums), jax.tree_util.tree_leaves(ran.sums)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
