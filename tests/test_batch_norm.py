"""Batch norm's written-out gradients (layers.affine, layers.normalize): the
values and gradients autodiff gives the plain formulas, and the reductions
their backward passes lower to on a GPU and on a CPU."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eicl_cli.model.layers import BatchNorm, affine, normalize

DTYPES = [jnp.float32, jnp.bfloat16]


def _inputs(dtype, seed=6, shape=(3, 5, 5, 8)):
    rng = np.random.default_rng(seed)
    x = jnp.asarray((rng.normal(size=shape) * 2 + 0.5).astype(np.float32)).astype(dtype)
    per_channel = [jnp.asarray(rng.normal(size=shape[-1]).astype(np.float32)) for _ in range(3)]
    weights = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    return x, per_channel, weights


# The written-out batch norm against autodiff's: another program, so
# reordered (values) and gradient-reordered tolerances (tests/TOLERANCES.md).
def _close(got, want, rtol, atol):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=atol)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_has_autodiffs_values_and_gradients(dtype, relu):
    x, (center, scale, offset), weights = _inputs(dtype)
    x = x.at[0, 0, 0].set(center.astype(dtype))  # some outputs exactly at the ReLU's kink
    offset = offset.at[:2].set(0.0)

    def plain(x, center, scale, offset):
        y = (x.astype(jnp.float32) - center) * scale + offset
        return (jax.nn.relu(y) if relu else y).astype(dtype)

    def mine(*args):
        return affine(*args, dtype, relu)

    def loss(f):
        return lambda *args: (f(*args).astype(jnp.float32) * weights).sum()

    args = (x, center, scale, offset)
    np.testing.assert_array_equal(np.asarray(mine(*args), np.float32),
                                  np.asarray(plain(*args), np.float32))
    _close(jax.grad(loss(mine), argnums=(0, 1, 2, 3))(*args),
           jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_is_batch_norm_with_autodiffs_gradients(dtype, relu):
    x, (scale, offset, _), weights = _inputs(dtype, seed=3)
    eps = 1e-5

    def plain(x, scale, offset):
        x32 = x.astype(jnp.float32)
        mean, mean_sq = x32.mean((0, 1, 2)), jnp.square(x32).mean((0, 1, 2))
        var = mean_sq - jnp.square(mean)
        y = (x32 - mean) * (scale * jax.lax.rsqrt(var + eps)) + offset
        return (jax.nn.relu(y) if relu else y).astype(dtype), mean, var

    def loss(f):
        # Weights on the statistics too: their gradient paths are checked
        # even though the model uses them only for the running averages.
        def value(*args):
            out, mean, var = f(*args)
            return ((out.astype(jnp.float32) * weights).sum() + 0.3 * mean.sum()
                    - 0.2 * var.sum())
        return value

    def mine(x, scale, offset):
        return normalize(x, scale, offset, eps, relu)

    args = (x, scale, offset)
    _close(mine(*args), plain(*args), rtol=1e-6, atol=1e-6)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    _close(jax.grad(loss(mine), argnums=(0, 1, 2))(*args),
           jax.grad(loss(plain), argnums=(0, 1, 2))(*args), rtol=tol, atol=tol)


def test_batch_norm_trains_on_its_batch_and_evaluates_on_its_running_averages():
    x, (scale, offset, _), _ = _inputs(jnp.float32, seed=4)
    bn = eqx.tree_at(lambda b: (b.scale, b.offset), BatchNorm(8), (scale, offset))
    state = eqx.nn.State(bn)
    out, state = bn(x, state, inference=False, relu=True)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    want = jax.nn.relu((x - mean) / jnp.sqrt(var + 1e-5) * scale + offset)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    hidden_mean, hidden_var, count = state.get(bn.stats)
    # Moments: the layer's E[x^2] - E[x]^2 against a two-pass variance.
    np.testing.assert_allclose(hidden_mean, 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hidden_var, 0.1 * var, rtol=1e-4, atol=1e-7)
    assert int(count) == 1
    # Evaluation: the (debiased) running averages, whatever the batch holds.
    other = x[:1] * 3.0 - 1.0
    out, same_state = bn(other, state, inference=True)
    # Reordered, and moments: normalised with float32 statistics from another program.
    np.testing.assert_allclose(out, (other - mean) / jnp.sqrt(var + 1e-5) * scale + offset,
                               rtol=1e-4, atol=1e-4)
    assert int(same_state.get(bn.stats)[2]) == 1


@pytest.mark.parametrize("which", ["affine", "normalize"])
def test_backward_sums_are_one_reduction_on_a_gpu_and_two_sums_on_a_cpu(which):
    x, (a, b, c), _ = _inputs(jnp.float32)
    if which == "affine":
        _, backward = jax.vjp(lambda *args: affine(*args, jnp.float32, True), x, a, b, c)
        cotangent = (x,)
    else:
        _, backward = jax.vjp(lambda *args: normalize(*args, 1e-5, True), x, a, b)
        cotangent = ((x, a, b),)

    def reductions(platform):
        text = jax.jit(backward).trace(*cotangent).lower(lowering_platforms=(platform,)).as_text()
        return [line.count(" init: ") for line in text.splitlines()
                if "stablehlo.reduce(" in line]

    # Both per-channel sums of the map-sized gradient: one pass on a GPU
    # (the forward statistics are not in the backward program).
    assert reductions("cuda") == [2]
    assert reductions("cpu") == [1, 1]
