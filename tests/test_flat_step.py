"""The training step over flat leaves equals the same update on pytrees."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eicl_cli.training.flat_step import Carry, FlatStep


class _Tiny(eqx.Module):
    w: jax.Array
    b: jax.Array


def _update(consts, model, state, opt_state, batch, step, sums):
    g = consts * batch["x"].sum() + step
    model = _Tiny(model.w - 0.1 * g, model.b + state["n"])
    return model, {"n": state["n"] + 1}, opt_state * 0.5, {"loss": sums["loss"] + g}


def test_flat_step_equals_the_update_and_keeps_the_structure():
    model, state, opt = _Tiny(jnp.arange(3.0), jnp.ones(())), {"n": jnp.zeros(())}, jnp.ones(2)
    step = FlatStep(_update)
    ref = jax.tree_util.tree_map(jnp.copy, (model, state, opt, {"loss": jnp.zeros(())}))
    carry, sums = Carry.pack(model, state, opt), {"loss": jnp.zeros(())}  # donated
    for t in range(3):
        batch = {"x": jnp.full((2,), float(t))}
        carry, sums = step(jnp.asarray(2.0), carry, batch, jnp.asarray(t), sums)
        ref = _update(jnp.asarray(2.0), *ref[:3], batch, jnp.asarray(t), ref[3])
    got = carry.unpack()
    assert isinstance(got[0], _Tiny)
    for a, b in zip(jax.tree_util.tree_leaves((got, sums)), jax.tree_util.tree_leaves(ref)):
        # Another program (a packed, donated carry; XLA may fuse and contract
        # the few elementwise ops into FMAs differently): a few ulps in 3 steps.
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_carry_with_a_non_array_leaf_is_refused():
    with pytest.raises(TypeError, match="only arrays; found \\['float'\\]"):
        Carry.pack({"w": jnp.ones(2), "lr": 0.1}, {}, ())
