"""Small building blocks shared by the encoders and sequence models.

Weights are stored as (in, out) so that `x @ w` reads like the original Haiku
layers and the parameter shapes match theirs one for one. Every layer takes a
`dtype` at call time: the compute dtype for mixed precision (parameters stay
float32 and are cast on use).
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Haiku's truncated normal cuts at two standard deviations; its
# VarianceScaling initialiser divides by this factor so that the truncated
# distribution keeps the requested standard deviation.
_TRUNC_STD_CORRECTION = 0.87962566103423978

# Initial parameters are drawn on the host with NumPy, seeded from the JAX key.
# Eager jax.random calls compile once per distinct shape, which made building
# the ResNet slow; NumPy draws need no compilation.
# The result is still a pure function of the key.


def _host_rng(key: jax.Array) -> np.random.Generator:
    return np.random.default_rng([int(v) for v in np.asarray(jax.random.key_data(key)).ravel()])


def split(key: jax.Array, n: int) -> list[jax.Array]:
    """n independent init keys derived from `key` (legacy uint32[2] keys)."""
    seeds = _host_rng(key).integers(0, 2**32, size=(n, 2), dtype=np.uint32)
    return [jnp.asarray(s) for s in seeds]


def truncated_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """Haiku's TruncatedNormal(stddev): a unit normal cut at +-2, times std."""
    rng = _host_rng(key)
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2.0
    while bad.any():  # redraw the tails: exactly a normal truncated to [-2, 2]
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2.0
    return jnp.asarray((x * std).astype(np.float32))


def zeros(shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.zeros(shape, np.float32))


def ones(shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.ones(shape, np.float32))


def fan_in_init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Haiku's default for Linear and Conv: TruncatedNormal(1 / sqrt(fan_in))."""
    fan_in = math.prod(shape[:-1])
    return truncated_normal(key, shape, 1.0 / math.sqrt(fan_in))


def variance_scaling_init(key: jax.Array, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    """Haiku's VarianceScaling(scale, fan_in, truncated_normal), used by the
    original's transformer dense layers and output head."""
    fan_in = math.prod(shape[:-1])
    std = math.sqrt(scale / fan_in) / _TRUNC_STD_CORRECTION
    return truncated_normal(key, shape, std)


class Dense(eqx.Module):
    """y = x @ w + b over the last axis."""

    weight: jax.Array  # (in, out)
    bias: jax.Array | None  # (out,)

    def __init__(self, n_in: int, n_out: int, key: jax.Array, *, bias: bool = True,
                 init: str = "fan_in"):
        shape = (n_in, n_out)
        self.weight = (variance_scaling_init(key, shape) if init == "variance_scaling"
                       else fan_in_init(key, shape))
        self.bias = zeros((n_out,)) if bias else None

    def __call__(self, x: jax.Array, dtype=jnp.float32) -> jax.Array:
        y = x.astype(dtype) @ self.weight.astype(dtype)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


class TiedHead(eqx.Module):
    """Logits read out through the label table itself (`embedding.label_head`):
    y = scale * x @ table.T (+ x @ w for "both") + b. A label's tied row trains
    whenever the label is shown as well as when it is the target, and copying
    a shown label's embedding scores that label whatever its index. The rows
    start tiny (std 0.02), so the learned scalar `scale` starts at
    1 / (0.02 * sqrt(emb_dim)) for "tied", where the logits then start at the
    untied head's size (std about 1), and at 0 for "both", which then starts
    as the paper's dense head."""

    bias: jax.Array  # (num_classes,)
    scale: jax.Array  # ()
    weight: jax.Array | None  # (emb_dim, num_classes) for "both"

    def __init__(self, num_classes: int, emb_dim: int, table_std: float, key: jax.Array,
                 *, dense: bool):
        self.bias = zeros((num_classes,))
        self.weight = variance_scaling_init(key, (emb_dim, num_classes)) if dense else None
        start = 0.0 if dense else 1.0 / (table_std * emb_dim ** 0.5)
        self.scale = jnp.asarray(start, jnp.float32)

    def __call__(self, x: jax.Array, table: jax.Array, dtype=jnp.float32) -> jax.Array:
        n = self.bias.shape[0]
        # One matmul against the summed weights, not two: x @ w + s x @ t.T.
        w = self.scale * table[:n].T
        if self.weight is not None:
            w = w + self.weight
        return x.astype(dtype) @ w.astype(dtype) + self.bias.astype(dtype)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis with scale and offset (Haiku's defaults,
    eps 1e-5). Statistics are always computed in float32."""

    scale: jax.Array
    offset: jax.Array
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = ones((dim,))
        self.offset = zeros((dim,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.eps) * self.scale + self.offset
        return y.astype(x.dtype)


class BatchNorm(eqx.Module):
    """Haiku-style batch norm over every axis but the last (channels).

    Training: normalise with the statistics of this call, reduced over every
    other axis. The model calls its encoder on all the images of a batch at
    once, as hk.BatchApply does in the original, so these are the statistics
    of the whole batch. The running averages are Haiku's zero-debiased
    exponential moving averages (hidden = decay * hidden + (1 - decay) *
    value, average = hidden / (1 - decay ** count)), kept in the Equinox
    state. Inference: normalise with those running averages.
    """

    scale: jax.Array
    offset: jax.Array
    stats: eqx.nn.StateIndex
    decay: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, *, decay: float = 0.9, eps: float = 1e-5,
                 zero_scale: bool = False):
        self.scale = (zeros if zero_scale else ones)((channels,))
        self.offset = zeros((channels,))
        self.stats = eqx.nn.StateIndex((
            zeros((channels,)),  # hidden mean
            zeros((channels,)),  # hidden variance
            jnp.asarray(np.zeros((), np.int32)),  # number of updates, for zero-debiasing
        ))
        self.decay = decay
        self.eps = eps

    def running_averages(self, state: eqx.nn.State) -> tuple[jax.Array, jax.Array]:
        hidden_mean, hidden_var, count = state.get(self.stats)
        debias = 1.0 - jnp.power(jnp.float32(self.decay), count.astype(jnp.float32))
        # Before the first update Haiku's average is 0; avoid dividing by 0.
        debias = jnp.where(count > 0, debias, 1.0)
        return hidden_mean / debias, hidden_var / debias

    def statistics_from_moments(self, mean: jax.Array | None, mean_sq: jax.Array | None,
                                state: eqx.nn.State, *, inference: bool
                                ) -> tuple[jax.Array, jax.Array, eqx.nn.State]:
        """(mean, var, new state) from the batch's per-channel mean and mean
        square in training, with the running averages updated; the running
        averages at inference (pass None for the moments there)."""
        if inference:
            mean, var = self.running_averages(state)
            return mean, var, state
        var = mean_sq - jnp.square(mean)
        return mean, var, self._update(state, mean, var)

    def multiplier(self, var: jax.Array) -> jax.Array:
        """scale / sqrt(var + eps): the per-channel slope of the normalisation."""
        return self.scale * lax.rsqrt(var + self.eps)

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, inference: bool,
                 relu: bool = False) -> tuple[jax.Array, eqx.nn.State]:
        """Normalise x, and apply a ReLU after when asked (its mask then
        comes into batch norm's own backward pass)."""
        if inference:
            mean, var = self.running_averages(state)
            return affine(x, mean, self.multiplier(var), self.offset, x.dtype, relu), state
        out, mean, var = normalize(x, self.scale, self.offset, self.eps, relu)
        return out, self._update(state, mean, var)

    def _update(self, state: eqx.nn.State, mean: jax.Array, var: jax.Array) -> eqx.nn.State:
        hidden_mean, hidden_var, count = state.get(self.stats)
        d = self.decay
        return state.set(self.stats, (
            d * hidden_mean + (1.0 - d) * lax.stop_gradient(mean),
            d * hidden_var + (1.0 - d) * lax.stop_gradient(var),
            count + 1,
        ))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: jax.Array, scale: jax.Array, offset: jax.Array, eps: float, relu: bool
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch norm in training, with a ReLU after if `relu`: (out, mean, var),
    the statistics per channel over every axis but the last, in float32, and
    out in x's dtype.

    Its gradient is the textbook one, in two passes over x-sized arrays: one
    reduction for both per-channel sums, then x's gradient. Left to autodiff,
    XLA's GPU compiler also wrote and read back the gradient of the affine
    map on its own, and launched more kernels: about 60 fewer per paper step
    on an H100 target."""
    return _normalize_fwd(x, scale, offset, eps, relu)[0]


def _normalize_fwd(x, scale, offset, eps, relu):
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean, mean_sq = x32.mean(axes), jnp.square(x32).mean(axes)
    var = mean_sq - jnp.square(mean)
    rstd = lax.rsqrt(var + eps)
    out = _affine_fwd(x, mean, scale * rstd, offset, x.dtype, relu)[0]
    return (out, mean, var), (x, scale, mean, rstd, out if relu else None)


def _normalize_bwd(eps, relu, res, cts):
    x, scale, mean, rstd, out = res
    g, g_mean, g_var = cts
    n = math.prod(x.shape[:-1])
    g, xc, d_offset, d_xc = _affine_sums(x, mean, g, out if relu else None)
    # out = xc * scale * rstd + offset, with mean and rstd functions of x.
    dx = (scale * rstd) * (g - d_offset / n - xc * (rstd * rstd) * (d_xc / n))
    dx = dx + g_mean / n + g_var * 2.0 * xc / n
    return dx.astype(x.dtype), d_xc * rstd, d_offset


normalize.defvjp(_normalize_fwd, _normalize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def affine(x: jax.Array, center: jax.Array, scale: jax.Array, offset: jax.Array,
           dtype, relu: bool) -> jax.Array:
    """(x - center) * scale + offset in float32, through a ReLU if `relu`,
    as `dtype`; per-channel center, scale and offset (batch norm's map).

    The gradient takes both per-channel sums (for the offset, and for the
    scale and center) as one reduction of two operands, beside x's
    gradient. Left to autodiff they were two reductions, which XLA's GPU
    compiler made two passes over the output's gradient, the second reading
    back a mask the first wrote."""
    return _affine_fwd(x, center, scale, offset, dtype, relu)[0]


def _affine_fwd(x, center, scale, offset, dtype, relu):
    out = (x.astype(jnp.float32) - center) * scale + offset
    out = (jax.nn.relu(out) if relu else out).astype(dtype)
    # The ReLU's mask comes from its output, as autodiff's would: made again
    # from x in another fusion, its rounding (a fused multiply-add or not)
    # could decide a value at the kink the other way.
    return out, (x, center, scale, offset, out if relu else None)


def _affine_bwd(dtype, relu, res, g):
    x, center, scale, offset, out = res
    g, _, d_offset, d_scale = _affine_sums(x, center, g, out)
    return ((g * scale).astype(x.dtype), -scale * d_offset, d_scale, d_offset)


def _affine_sums(x, center, g, relu_out):
    """(g through the ReLU's mask, x - center, and the per-channel sums of
    the first and of the product of both), all float32; relu_out None: no
    ReLU."""
    xc = x.astype(jnp.float32) - center
    g = g.astype(jnp.float32)
    if relu_out is not None:
        g = jnp.where(relu_out > 0, g, 0.0)
    axes = tuple(range(g.ndim - 1))
    sums = lax.platform_dependent(g, xc, cpu=functools.partial(_two_sums, axes=axes),
                                  default=functools.partial(_one_pass, axes=axes))
    return g, xc, *sums


def _one_pass(g, xc, axes):
    return lax.reduce((g, g * xc), (0.0, 0.0), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)


def _two_sums(g, xc, axes):
    # XLA's CPU backend ran the two-operand reduction 1.7x slower than two
    # plain sums on a (288, 27, 27, 64) map.
    return g.sum(axes), (g * xc).sum(axes)


affine.defvjp(_affine_fwd, _affine_bwd)


def dropout(key: jax.Array | None, rate: float, x: jax.Array) -> jax.Array:
    """Inverted dropout (Haiku's): keep with probability 1 - rate, rescale."""
    if rate <= 0.0:
        return x
    if key is None:
        raise ValueError("dropout with rate > 0 needs a PRNG key")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def same_out(size: int, stride: int) -> int:
    return -(-size // stride)


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding (the smaller half before) of one spatial axis."""
    total = max((same_out(size, stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
