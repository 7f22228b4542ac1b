"""Stacked runs (eicl sweep --stack K): K runs in one vmapped step equal the
same runs trained one by one, write ordinary run folders, and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eicl_cli import config, runs
from eicl_cli.experiment_keys import stack_identity
from eicl_cli.training.trainer import check_stackable
from eicl_cli import training
from eicl_cli.errors import EiclError
from train_support import tensors, tiny

# A one-group ResNet: batch norm must reduce over each run's own batch only.
MODEL = ["embedding.example_encoder=\"resnet\"", "embedding.resnet_blocks_per_group=[1]",
         "embedding.resnet_channels_per_group=[]", "sequences.noise_scale=0.1",
         "transformer.dropout_prob=0.1", "run.log_every=1", "run.eval_every=6",
         "run.checkpoint_every=3", "train.batch_size=8"]
# Four points: two data distributions x two seeds.
POINTS = [("sequences.p_bursty=0.0", "run.seed=0"), ("sequences.p_bursty=0.9", "run.seed=1"),
          ("sequences.p_bursty=1.0", "run.seed=0"),
          ("classes.zipf_exponent=1.0", "run.seed=2")]


def _configs(data_dir: Path, steps: int) -> list[config.Config]:
    return [training.resolved_config(tiny(data_dir, *MODEL, *p, f"run.steps={steps}"))
            for p in POINTS]


def _new_dir(cfg: config.Config, path: Path) -> Path:
    runs.new_run_dir(cfg, None, path)
    runs.write_config(path, cfg)
    return path


@pytest.mark.slow  # compiles the ResNet step twice (plain and stacked)
def test_stacked_points_equal_the_same_points_trained_one_by_one(data_dir: Path, tmp_path: Path):
    alone = []
    for i, cfg in enumerate(_configs(data_dir, 6)):
        run_dir = _new_dir(cfg, tmp_path / f"alone{i}")
        training.train_runs([cfg], [run_dir], live=False)
        alone.append(run_dir)

    # The stack runs 3 steps, stops, and resumes as a stack to 6.
    cfgs3 = _configs(data_dir, 3)
    stacked = [_new_dir(cfg, tmp_path / f"stacked{i}") for i, cfg in enumerate(cfgs3)]
    assert training.train_runs(cfgs3, stacked, live=False).step == 3
    assert training.train_runs(_configs(data_dir, 6), stacked, live=False).step == 6

    for a, s in zip(alone, stacked):
        ta, ts = runs.read_metrics(a, kind="train"), runs.read_metrics(s, kind="train")
        assert [r["step"] for r in ts] == [1, 2, 3, 4, 5, 6]
        assert [(e["step"], e["stacked_with"], e["steps_per_call"])
                for e in runs.read_environment(s)] == [(0, 4, 1), (3, 4, 1)]
        assert not (s / runs.TRAIN_LOCK).exists()
        # The vmapped step is another program (XLA may reassociate its sums per
        # CPU), and Adam turns that rounding into parameter moves up to the step
        # size within 5 steps: losses agree to 1e-3, not to float32's 1e-7.
        np.testing.assert_allclose([r["loss"] for r in ts], [r["loss"] for r in ta],
                                   rtol=1e-3, atol=1e-5)
        # (The stack also evaluated at step 3, where its first leg ended.)
        ea = runs.read_metrics(a, kind="eval")
        es = [r for r in runs.read_metrics(s, kind="eval") if r["step"] == 6]
        assert [r["mode"] for r in es] == [r["mode"] for r in ea]
        for ra, rs in zip(ea, es):
            assert rs["accuracy_query"] == pytest.approx(ra["accuracy_query"], abs=0.02)
        assert runs.read_config(s).run.steps == 6
        assert [st for st, _ in runs.list_checkpoints(s)] == [3, 6]
        ca = tensors(runs.checkpoint_path(a, 6))
        cs = tensors(runs.checkpoint_path(s, 6))
        assert ca.keys() == cs.keys()
        for name in ca:
            # Adam turns rounding-level gradients into full steps: compare
            # parameters at the step size; batch-norm statistics are means of
            # activations of those parameters, so they can differ as much.
            tol = dict(rtol=1e-3, atol=1e-5) if name.startswith("state.") else \
                dict(rtol=1e-3, atol=5e-4)
            np.testing.assert_allclose(cs[name], ca[name], err_msg=name, **tol)
    # Different data and seeds really gave different runs.
    losses = [runs.read_metrics(s, kind="train")[-1]["loss"] for s in stacked]
    assert len(set(np.round(losses, 6))) == 4


def test_stack_refuses_runs_of_different_shapes_naming_the_key(data_dir: Path):
    a = tiny(data_dir)
    b = tiny(data_dir, "embedding.emb_dim=16")
    with pytest.raises(EiclError, match="embedding.emb_dim differs"):
        check_stackable([a, b], ["a", "b"])
    c = tiny(data_dir, "sequences.p_bursty=0.1", "run.seed=3", "classes.zipf_exponent=1.5")
    check_stackable([a, c])
    assert stack_identity(a) == stack_identity(c) != stack_identity(b)


def test_stacked_runs_must_resume_from_one_step(data_dir: Path, tmp_path: Path):
    cfgs = [tiny(data_dir, "run.steps=2", "run.checkpoint_every=1", f"run.seed={i}")
            for i in range(2)]
    dirs = [_new_dir(training.resolved_config(c), tmp_path / f"r{i}") for i, c in enumerate(cfgs)]
    training.train_runs([training.resolved_config(cfgs[0])], [dirs[0]], live=False)
    with pytest.raises(EiclError, match="resume from one step"):
        training.train_runs([training.resolved_config(c) for c in cfgs], dirs, live=False)
