"""The fast ResNet stem (pool before batch norm's affine map, the one-channel
convolution's weight gradient as a GEMM) against the plain formulation:
XLA convolution, batch norm, ReLU, reduce_window max pool."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from eicl_cli.model.encoders import ConvEncoder, ResNetEncoder, _stem


def _reference_stem(conv, norm, images, state):
    y = lax.conv_general_dilated(images[..., None], conv.weight, (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, state = norm(y, state, inference=False)
    return lax.reduce_window(jax.nn.relu(y), -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             "SAME"), state


def _loss(stem_fn):
    def loss(params, images, state):
        conv, norm = params
        out, new_state = jax.vmap(lambda im: stem_fn(conv, norm, im, state), axis_name="batch",
                                  out_axes=(0, None))(images)
        weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out * weights).sum(), (out, new_state)
    return loss


@pytest.mark.parametrize("size", [105, 28])
def test_fast_stem_matches_plain_stem_in_values_gradients_and_statistics(size):
    enc = ResNetEncoder((1,), (16,), jax.random.key(1))
    # Some channels with a negative batch-norm scale: their max pool becomes a min.
    enc = eqx.tree_at(lambda e: e.initial_norm.scale, enc, enc.initial_norm.scale.at[:5].set(-0.7))
    rng = np.random.default_rng(0)
    images = jnp.asarray((rng.random((2, 3, size, size)) > 0.3).astype(np.float32))
    params = (enc.initial_conv, enc.initial_norm)
    grad = lambda f, st: eqx.filter_value_and_grad(_loss(f), has_aux=True)(params, images, st)
    (_, (ref_out, ref_state)), ref_grads = grad(_reference_stem, eqx.nn.State(enc))
    fast = lambda c, n, im, st: _stem(c, n, im, st, inference=False, dtype=jnp.float32)
    (_, (out, state)), grads = grad(fast, eqx.nn.State(enc))
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    leaves = lambda t: jax.tree_util.tree_leaves(eqx.filter(t, eqx.is_inexact_array))
    for g, r in zip(leaves(grads), leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_first_conv_of_the_conv_encoder_gets_the_same_weight_gradient():
    enc = ConvEncoder((28, 28), (8, 8), 16, jax.random.key(2))
    images = jnp.asarray(np.random.default_rng(1).random((5, 28, 28)).astype(np.float32))

    def loss(conv, images, plain):
        x = images[..., None]
        if plain:
            y = lax.conv_general_dilated(x, conv.weight, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias
        else:
            y = conv(x)
        return jnp.sum(jnp.tanh(y) * jnp.cos(y))

    fast = eqx.filter_grad(loss)(enc.convs[0], images, False)
    plain = eqx.filter_grad(loss)(enc.convs[0], images, True)
    np.testing.assert_allclose(fast.weight, plain.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.bias, plain.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 53, 53, 3), (2, 54, 52, 3), (1, 1, 1, 2), (1, 2, 3, 1),
                                   (2, 7, 6, 2), (3, 27, 27, 4)])
def test_max_pool_equals_reduce_window_in_values_and_gradients(shape):
    from eicl_cli.model.encoders import _max_pool_3x3_s2

    def ref(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    np.testing.assert_array_equal(_max_pool_3x3_s2(x), ref(x))
    w = jnp.arange(ref(x).size, dtype=jnp.float32).reshape(ref(x).shape)
    expected = jax.grad(lambda x: (ref(x) * w).sum())(x)
    np.testing.assert_array_equal(jax.grad(lambda x: (_max_pool_3x3_s2(x) * w).sum())(x),
                                  expected)
    per_example = jax.vmap(jax.grad(lambda x, w: (_max_pool_3x3_s2(x[None])[0] * w).sum()))
    np.testing.assert_array_equal(per_example(x, w), expected)
