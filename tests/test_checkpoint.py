"""Checkpoint format, integrity checks and pruning, and the optimizer schedule."""

from __future__ import annotations

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open

from eicl_cli import checkpoint, config, optim, runs
from eicl_cli.checkpoint import CheckpointError


class _Net(eqx.Module):
    """A tiny module with parameters and batch-norm state, for format tests only."""

    lin: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, width: int, key):
        self.lin = eqx.nn.Linear(3, width, key=key)
        self.bn = eqx.nn.BatchNorm(width, axis_name="batch", mode="ema")

    def __call__(self, x, state):
        return self.bn(self.lin(x), state)


def _make(width: int = 4, seed: int = 0):
    model, state = eqx.nn.make_with_state(_Net)(width, jax.random.key(seed))
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    return model, state, opt, opt_state


def _trained(steps: int = 3):
    model, state, opt, opt_state = _make()
    x = jnp.arange(12.0).reshape(4, 3)

    def loss(m, s):
        y, s = jax.vmap(m, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, s)
        return jnp.mean(y ** 2), s

    for _ in range(steps):
        (_, state), g = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
        upd, opt_state = opt.update(g, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model = eqx.apply_updates(model, upd)
    return model, state, opt_state


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def test_roundtrip_restores_every_leaf(tmp_path: Path):
    model, state, opt_state = _trained()
    path = tmp_path / "step_00000003.safetensors"
    checkpoint.save(path, step=3, model=model, state=state, opt_state=opt_state,
                    config_toml="x = 1\n")
    skel_model, skel_state, _, skel_opt = _make(seed=1)
    got = checkpoint.load(path, model=skel_model, state=skel_state, opt_state=skel_opt)
    assert got.step == 3
    assert got.metadata["config"] == "x = 1\n"
    assert got.metadata["format"] == "eicl-checkpoint" and got.metadata["version"] == "1"
    for tree_a, tree_b in ((model, got.model), (state, got.state), (opt_state, got.opt_state)):
        a, b = _leaves(tree_a), _leaves(tree_b)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    # Names are readable paths, not pickled structure.
    with safe_open(str(path), framework="np") as f:
        names = set(f.keys())
    assert {"params.lin.weight", "params.bn.weight", "opt.0.count", "opt.0.mu.lin.weight"} <= names
    assert not list(tmp_path.glob("*.tmp"))


def test_an_abstract_optimizer_skeleton_loads_the_same_arrays(tmp_path: Path):
    # `eicl eval` reads a run's parameter average from its optimizer state and
    # builds that skeleton with jax.eval_shape, allocating nothing.
    model, state, opt_state = _trained()
    path = tmp_path / "step_00000003.safetensors"
    checkpoint.save(path, step=3, model=model, state=state, opt_state=opt_state, config_toml="")
    skel_model, skel_state, opt, _ = _make(seed=1)
    abstract = jax.eval_shape(opt.init, eqx.filter(skel_model, eqx.is_inexact_array))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))
    got = checkpoint.load(path, model=skel_model, state=skel_state, opt_state=abstract)
    a, b = _leaves(opt_state), _leaves(got.opt_state)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path):
    model, state, opt_state = _trained()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, step=1, model=model, state=state, opt_state=opt_state, config_toml="")
    wide_model, wide_state, _, wide_opt = _make(width=5)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path, model=wide_model, state=wide_state, opt_state=wide_opt)
    msg = str(e.value)
    assert "params.lin.weight" in msg and "(4, 3)" in msg and "(5, 3)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_checkpoint_is_refused_in_one_line(tmp_path: Path, damage: str):
    model, state, opt_state = _trained()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, step=1, model=model, state=state, opt_state=opt_state, config_toml="")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the last tensor's bytes: only the checksum sees it
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint at all" * 10)
    path.write_bytes(bytes(data))
    skel = _make(seed=2)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path, model=skel[0], state=skel[1], opt_state=skel[3])
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_load_without_optimizer_state(tmp_path: Path):
    model, state, opt_state = _trained()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, step=2, model=model, state=state, opt_state=opt_state, config_toml="")
    skel = _make(seed=3)
    got = checkpoint.load(path, model=skel[0], state=skel[1])
    assert got.opt_state is None
    assert np.array_equal(np.asarray(got.model.lin.weight), np.asarray(model.lin.weight))


def test_prune_keeps_newest_and_final(tmp_path: Path):
    model, state, opt_state = _trained(1)
    run = tmp_path / "run"
    runs.checkpoint_dir(run).mkdir(parents=True)
    for step in (10, 20, 30, 40, 50):
        checkpoint.save(runs.checkpoint_path(run, step), step=step, model=model, state=state,
                        opt_state=opt_state, config_toml="", final=(step == 20))
    checkpoint.prune(runs.list_checkpoints(run), keep=2)
    assert [s for s, _ in runs.list_checkpoints(run)] == [20, 40, 50]


def _cfg(**opt) -> config.Config:
    return config.from_dict({"optimizer": opt, "run": {"steps": 100}})


def test_rsqrt_schedule_matches_the_original_formula():
    cfg = _cfg(max_lr=3e-4, warmup_steps=4000, schedule="rsqrt")
    lr = optim.learning_rate_schedule(cfg.optimizer, cfg.run.steps)
    for t in (0, 1, 2000, 3999, 4000, 4001, 16000, 500_000):
        # The original: min(max_lr / warmup * t, sqrt(warmup) * max_lr * t ** -0.5).
        expect = 0.0 if t == 0 else min(3e-4 / 4000 * t, math.sqrt(4000) * 3e-4 * t ** -0.5)
        assert float(lr(jnp.asarray(t))) == pytest.approx(expect, rel=1e-5, abs=1e-12)
    assert float(lr(jnp.asarray(16000))) == pytest.approx(1.5e-4, rel=1e-5)


def test_constant_and_cosine_schedules():
    c = _cfg(max_lr=1e-3, warmup_steps=10, schedule="constant")
    lr = optim.learning_rate_schedule(c.optimizer, 100)
    assert float(lr(5)) == pytest.approx(5e-4) and float(lr(50)) == pytest.approx(1e-3)
    c = _cfg(max_lr=1e-3, warmup_steps=10, schedule="cosine")
    lr = optim.learning_rate_schedule(c.optimizer, 100)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(55)) == pytest.approx(5e-4, rel=1e-4)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)


def test_first_update_is_zero_lr_and_clipping_bounds_the_step():
    model, state, _, _ = _make()
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 100.0), params)
    opt = optim.make_optimizer(_cfg(max_lr=1.0, warmup_steps=4, schedule="rsqrt"))
    st = opt.init(params)
    upd, st = opt.update(grads, st, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(upd))
    upd, st = opt.update(grads, st, params)  # t = 1: lr = 0.25
    assert max(float(jnp.abs(u).max()) for u in jax.tree_util.tree_leaves(upd)) > 0.2
    # SGD with clipping: the update's global norm is lr * clip_level.
    opt = optim.make_optimizer(_cfg(name="sgd", max_lr=1.0, warmup_steps=0,
                                    schedule="constant", clip_level=0.5))
    upd, _ = opt.update(grads, opt.init(params), params)
    assert float(optax.tree.norm(upd)) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_every_named_optimizer_builds_and_steps(name: str):
    model, _, _, _ = _make()
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = optim.make_optimizer(_cfg(name=name, warmup_steps=0, weight_decay=0.01))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, _ = opt.update(grads, opt.init(params), params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree_util.tree_leaves(upd))
