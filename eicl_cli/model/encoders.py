"""Example encoders: one image (or symbol) per sequence item -> an emb_dim vector.

Every encoder maps a whole sequence at once, (L, H, W) float images or (L,)
int symbols -> (L, out_dim), so convolutions run as one batched op and batch
norm can reduce over the L images of the sequence and, through the named vmap
axis, over the sequences of the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ..config import CONV_IMPLS
from ..errors import EiclError
from .layers import BatchNorm, Dense, fan_in_init, split, truncated_normal, zeros

_NHWC = ("NHWC", "HWIO", "NHWC")


def _same_out(size: int, stride: int) -> int:
    return -(-size // stride)


class Conv2D(eqx.Module):
    """A 2-D convolution over NHWC input with SAME padding (Haiku's default).

    `reads_images`: the input is the (one-channel) data itself, never trained,
    so the backward pass computes only the weight gradient, as one GEMM.
    `gemm`: compute a k x k convolution as one matrix product over the k * k
    shifted input windows instead of XLA's convolution. The same function;
    under `sweep --stack` vmap turns XLA's convolution into a grouped one
    (one group per run), while the product becomes a batched GEMM."""

    weight: jax.Array  # (kh, kw, in, out)
    bias: jax.Array | None
    stride: int = eqx.field(static=True)
    reads_images: bool = eqx.field(static=True)
    gemm: bool = eqx.field(static=True)

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, key: jax.Array,
                 *, bias: bool = False, reads_images: bool = False, gemm: bool = False):
        self.weight = fan_in_init(key, (kernel, kernel, n_in, n_out))
        self.bias = zeros((n_out,)) if bias else None
        self.stride = stride
        self.reads_images = reads_images
        self.gemm = gemm

    def __call__(self, x: jax.Array, dtype=jnp.float32) -> jax.Array:
        kh, kw, n_in, n_out = self.weight.shape
        w = self.weight.astype(dtype)
        x = x.astype(dtype)
        if kh == kw == 1:
            # A 1x1 conv is a matmul over channels; strided = subsample first.
            if self.stride > 1:
                x = x[:, ::self.stride, ::self.stride]
            y = x @ w[0, 0]
        elif self.reads_images and n_in == 1:
            y = (_image_conv_gemm if self.gemm else _image_conv)(x, w, self.stride)
        elif self.gemm:
            y = _conv_gemm(x, w, self.stride)
        else:
            y = _conv(x, w, self.stride)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


def _conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_NHWC)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding (the smaller half before) of one spatial axis."""
    total = max((_same_out(size, stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_gemm(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """_conv as im2col: the kh * kw strided windows of the SAME-padded input,
    side by side on the channel axis, times the kernel as a (kh * kw * in, out)
    matrix. Costs kh * kw copies of the input; the ResNet's 3 x 3 convolutions
    run on 4-16 channels, so those copies are small."""
    kh, kw, n_in, n_out = w.shape
    n, h, wd, _ = x.shape
    oh, ow = _same_out(h, stride), _same_out(wd, stride)
    xp = jnp.pad(x, ((0, 0), _same_pads(h, kh, stride), _same_pads(wd, kw, stride), (0, 0)))
    windows = [lax.slice(xp, (0, a, b, 0), (n, a + (oh - 1) * stride + 1,
                                            b + (ow - 1) * stride + 1, n_in),
                         (1, stride, stride, 1))
               for a in range(kh) for b in range(kw)]
    return jnp.concatenate(windows, axis=-1) @ w.reshape(kh * kw * n_in, n_out)


def _stem_taps(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """(kh * kw, N * OH * OW): the SAME-padded input pixel under each kernel tap
    at every output position, one contiguous row per tap.

    The padded images are split into stride x stride phases (every stride-th
    row and column from each offset), so each tap is a unit-stride window of
    one phase, and one gather reads all kh * kw windows: XLA's CPU backend
    stacked 49 strided views at a third of memory speed, and writing them into
    a zeroed buffer one by one still cost a full extra pass."""
    n, h, wd, _ = x.shape
    oh, ow = _same_out(h, stride), _same_out(wd, stride)
    top, left = _same_pads(h, kh, stride)[0], _same_pads(wd, kw, stride)[0]
    rows = -(-((oh - 1) * stride + kh) // stride) * stride  # padded size, a multiple of stride
    cols = -(-((ow - 1) * stride + kw) // stride) * stride
    xp = jnp.pad(x[..., 0], ((0, 0), (top, rows - h - top), (left, cols - wd - left)))
    phases = xp.reshape(n, rows // stride, stride, cols // stride, stride)
    phases = phases.transpose(2, 4, 0, 1, 3).reshape(stride * stride, n, rows // stride,
                                                     cols // stride)
    starts = jnp.asarray([[(a % stride) * stride + b % stride, 0, a // stride, b // stride]
                          for a in range(kh) for b in range(kw)], jnp.int32)
    dims = lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(0,),
                                      start_index_map=(0, 1, 2, 3))
    taps = lax.gather(phases, starts, dims, slice_sizes=(1, n, oh, ow),
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return taps.reshape(kh * kw, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _image_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """SAME convolution of one-channel NHWC data, for the ResNet's stem.

    The forward pass is XLA's convolution. Its weight gradient, which XLA's
    CPU backend computes slowly for one input channel (it was most of the
    paper model's step), is one GEMM: taps (k*k, pixels) @ dy (pixels, out).
    The images are data, never trained, so no gradient flows back to them
    (the cotangent returned for x is zero)."""
    return _conv(x, w, stride)


def _image_conv_fwd(x, w, stride):
    return _conv(x, w, stride), (x, w)


def _image_conv_bwd(stride, res, dy):
    x, w = res
    kh, kw, _, n_out = w.shape
    taps = _stem_taps(x, kh, kw, stride).astype(dy.dtype)
    dw = (taps @ dy.reshape(-1, n_out)).reshape(kh, kw, 1, n_out)
    return jnp.zeros_like(x), dw.astype(w.dtype)


_image_conv.defvjp(_image_conv_fwd, _image_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _image_conv_gemm(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """_image_conv with the forward pass as a GEMM too, over the same taps:
    y = taps^T (pixels, k*k) @ w (k*k, out). The taps are kept for the
    backward pass instead of being gathered twice."""
    return _image_conv_gemm_fwd(x, w, stride)[0]


def _image_conv_gemm_fwd(x, w, stride):
    kh, kw, _, n_out = w.shape
    n, h, wd, _ = x.shape
    taps = _stem_taps(x, kh, kw, stride).astype(w.dtype)
    y = lax.dot_general(taps, w.reshape(kh * kw, n_out), (((0,), (0,)), ((), ())))
    return y.reshape(n, _same_out(h, stride), _same_out(wd, stride), n_out), (x, taps, w)


def _image_conv_gemm_bwd(stride, res, dy):
    x, taps, w = res
    kh, kw, _, n_out = w.shape
    dw = (taps.astype(dy.dtype) @ dy.reshape(-1, n_out)).reshape(kh, kw, 1, n_out)
    return jnp.zeros_like(x), dw.astype(w.dtype)


_image_conv_gemm.defvjp(_image_conv_gemm_fwd, _image_conv_gemm_bwd)


def _slice(a: jax.Array, start: int, stop: int, axis: int, step: int = 1) -> jax.Array:
    return lax.slice_in_dim(a, start, stop, step, axis)


def _rule3(n: int):
    """The choice among a window's three elements (a, b, c) along an axis of
    n elements (0/1/2): ties to the middle one for odd n, to the first for
    even n. The rule of both pooling forms."""
    if n % 2:
        return lambda a, b, c: jnp.where(b >= jnp.maximum(a, c), 1, jnp.where(a >= c, 0, 2))
    return lambda a, b, c: jnp.where(a >= jnp.maximum(b, c), 0, jnp.where(b >= c, 1, 2))


def _max3_choice(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Max over stride-2 windows of 3 along `axis`, SAME padding, and which
    element holds it (int8 0/1/2 = first/middle/last of the window). For odd
    sizes window i is x[2i-1..2i+1], for even ones x[2i..2i+2]; the -inf
    padding is never chosen. Ties go to the middle for odd sizes, to the
    earliest element for even ones. The edge windows (those touching the
    padding) are computed apart and joined to the interior, so the big input
    is read through strided views and never copied padded."""
    n = x.shape[axis]
    if n == 1:  # the one window holds only x[0] (in the middle)
        return x, jnp.ones(x.shape, jnp.int8)
    even, odd = _slice(x, 0, n, axis, 2), _slice(x, 1, n, axis, 2)
    m = even.shape[axis]
    pieces = []
    if n % 2:  # odd size: first window (x[0], x[1]), last (x[n-2], x[n-1])
        e0, o0 = _slice(even, 0, 1, axis), _slice(odd, 0, 1, axis)
        pieces.append((jnp.maximum(e0, o0), jnp.where(e0 >= o0, 1, 2)))
        if m > 2:
            a, b, c = _slice(odd, 0, m - 2, axis), _slice(even, 1, m - 1, axis), \
                _slice(odd, 1, m - 1, axis)
            pieces.append((jnp.maximum(jnp.maximum(b, a), c),
                           _rule3(n)(a, b, c)))
        el, ol = _slice(even, m - 1, m, axis), _slice(odd, m - 2, m - 1, axis)
        pieces.append((jnp.maximum(el, ol), jnp.where(el >= ol, 1, 0)))
    else:  # even size: windows (x[2i], x[2i+1], x[2i+2]), the last one (x[n-2], x[n-1])
        if m > 1:
            a, b, c = _slice(even, 0, m - 1, axis), _slice(odd, 0, m - 1, axis), \
                _slice(even, 1, m, axis)
            pieces.append((jnp.maximum(jnp.maximum(a, b), c),
                           _rule3(n)(a, b, c)))
        el, ol = _slice(even, m - 1, m, axis), _slice(odd, m - 1, m, axis)
        pieces.append((jnp.maximum(el, ol), jnp.where(el >= ol, 0, 1)))
    out = jnp.concatenate([v for v, _ in pieces], axis=axis)
    code = jnp.concatenate([c.astype(jnp.int8) for _, c in pieces], axis=axis)
    return out, code


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max3_s2(x: jax.Array, axis: int) -> jax.Array:
    """Max over stride-2 windows of 3 along `axis` (SAME padding, -inf).

    Its gradient goes to the chosen element of each window, as
    select-and-scatter's does, but is built from two interleaved halves
    (every even element lies in one window, every odd one in two, or the
    other way round for even sizes): no padded or scattered copies, and the
    forward pass keeps only an int8 choice per output."""
    return _max3_choice(x, axis)[0]


def _max3_fwd(x, axis):
    out, code = _max3_choice(x, axis)
    return out, (code, x.shape[axis])


def _max3_bwd(axis, res, g):
    code, n = res
    m = g.shape[axis]
    zero = jnp.zeros((), g.dtype)
    pick = lambda k: jnp.where(code == k, g, zero)  # noqa: E731
    cat = lambda parts: jnp.concatenate(parts, axis=axis)  # noqa: E731
    if n % 2:
        # even x[2k]: centre of window k; odd x[2k+1]: after of k, before of k+1
        d_even = pick(1)
        after, before = pick(2), pick(0)
        d_odd = _slice(after, 0, m - 1, axis) + _slice(before, 1, m, axis)
        d_odd = cat([d_odd, jnp.zeros_like(_slice(g, 0, 1, axis))])  # pad to m for interleaving
    else:
        # even x[2k]: first of window k, last of window k-1; odd x[2k+1]: middle of k
        last = pick(2)
        d_even = pick(0) + cat([jnp.zeros_like(_slice(g, 0, 1, axis)), _slice(last, 0, m - 1, axis)])
        d_odd = pick(1)
    both = jnp.stack([d_even, d_odd], axis=axis + 1)
    shape = list(g.shape)
    shape[axis] = 2 * m
    return (_slice(both.reshape(shape), 0, n, axis),)


_max3_s2.defvjp(_max3_fwd, _max3_bwd)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3 x 3 stride-2 SAME max pool (padding counts as -inf), NHWC.

    Separable (rows, then columns) maxima of strided views: lax.reduce_window's
    gradient (select-and-scatter) is ~15x slower on CPU. Ties split the
    gradient where select-and-scatter picks one; tied inputs of a stem feature
    map come from identical image patches, so the weight gradient is the same.
    """
    return _max3_s2(_max3_s2(x, 1), 2)


def _signed_max_pool(y: jax.Array, sign: jax.Array) -> jax.Array:
    """_max_pool_3x3_s2(y * sign) for a per-channel sign of +-1.

    The sign multiplies the incoming gradient at the pooled resolution
    (a quarter of the pixels) rather than the outgoing one: written as
    y * sign, XLA kept the per-channel sign broadcast to the whole stem map
    (288 x 53 x 53 x 64 floats for the paper's batch) between the forward
    and backward passes.

    Two forms of the same values and gradients, picked when the step is
    compiled: on a CPU, rows then columns through strided views, as
    _max_pool_3x3_s2 (padding the map cost a pass there); elsewhere all nine
    window elements of the -inf-padded map at once, which XLA fuses into one
    pass forward and one backward, batch norm's gradient included (on an H100
    target 1.2 GB less memory traffic per paper step: 4.8 against 6.0 GB)."""
    return lax.platform_dependent(y, sign, cpu=_signed_max_pool_separable,
                                  default=_signed_max_pool_2d)


@jax.custom_vjp
def _signed_max_pool_separable(y: jax.Array, sign: jax.Array) -> jax.Array:
    return _max_pool_3x3_s2(y * sign)


def _signed_max_pool_fwd(y, sign):
    rows, row_code = _max3_choice(y * sign, 1)
    out, col_code = _max3_choice(rows, 2)
    return out, (row_code, col_code, y.shape[1], rows.shape[2], sign)


def _signed_max_pool_bwd(res, g):
    row_code, col_code, h, w, sign = res
    (g_rows,) = _max3_bwd(2, (col_code, w), g * sign)
    (dy,) = _max3_bwd(1, (row_code, h), g_rows)
    return dy, jnp.zeros_like(sign)


_signed_max_pool_separable.defvjp(_signed_max_pool_fwd, _signed_max_pool_bwd)


def _pad_axes(x: jax.Array, pads: dict[int, tuple[int, int]], value: float = 0.0) -> jax.Array:
    widths = [pads.get(axis, (0, 0)) for axis in range(x.ndim)]
    return jnp.pad(x, widths, constant_values=value)


def _max_pool_choice_2d(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 3 x 3 stride-2 SAME max pool of NHWC `x` and the window element
    holding each maximum, int8 3a + b for row a and column b of the window,
    with _max3_choice's choices (_rule3): each column's best row first, then
    the best of those columns. The -inf padding puts the edge windows under the
    interior's rule (one -inf in front along an axis of odd size), which
    makes the same choices as _max3_choice's edge cases."""
    (h, w), (mh, mw) = x.shape[1:3], (_same_out(x.shape[1], 2), _same_out(x.shape[2], 2))
    xp = _pad_axes(x, {1: (h % 2, 2 * mh + 1 - h - h % 2), 2: (w % 2, 2 * mw + 1 - w - w % 2)},
                   -jnp.inf)
    rule_h, rule_w = _rule3(h), _rule3(w)
    best, row_of = [], []  # per window column b: the best row's value and index
    for b in range(3):
        col = _slice(xp, b, b + 2 * mw - 1, 2, 2)
        v = [_slice(col, a, a + 2 * mh - 1, 1, 2) for a in range(3)]
        best.append(jnp.maximum(jnp.maximum(v[0], v[1]), v[2]))
        row_of.append(rule_h(*v))
    col_choice = rule_w(*best)
    row_choice = jnp.where(col_choice == 0, row_of[0],
                           jnp.where(col_choice == 1, row_of[1], row_of[2]))
    out = jnp.maximum(jnp.maximum(best[0], best[1]), best[2])
    return out, (3 * row_choice + col_choice).astype(jnp.int8)


def _max_pool_bwd_2d(code: jax.Array, g: jax.Array, h: int, w: int) -> jax.Array:
    """The gradient of _max_pool_choice_2d's maximum: each window's gradient
    to its chosen element. Padded element (2k + a', 2l + b') collects window
    (k, l)'s choice (a', b') and, for a' or b' = 0, the neighbouring windows'
    choices 2 rows or columns on; summed per window row as the separable
    form sums them (the same float additions), then interleaved and cut."""
    zero = jnp.zeros((), g.dtype)
    pick = lambda a, b: jnp.where(code == 3 * a + b, g, zero)  # noqa: E731
    here = lambda x: _pad_axes(x, {1: (0, 1), 2: (0, 1)})  # noqa: E731
    up = lambda x: _pad_axes(x, {1: (1, 0), 2: (0, 1)})  # window k - 1 # noqa: E731
    left = lambda x: _pad_axes(x, {1: (0, 1), 2: (1, 0)})  # window l - 1 # noqa: E731
    up_left = lambda x: _pad_axes(x, {1: (1, 0), 2: (1, 0)})  # noqa: E731
    even_even = (here(pick(0, 0)) + left(pick(0, 2))) + (up(pick(2, 0)) + up_left(pick(2, 2)))
    even_odd = here(pick(0, 1)) + up(pick(2, 1))
    odd_even = here(pick(1, 0)) + left(pick(1, 2))
    odd_odd = here(pick(1, 1))
    rows_even = jnp.stack([even_even, even_odd], axis=3)  # (N, MH+1, MW+1, 2, C)
    rows_odd = jnp.stack([odd_even, odd_odd], axis=3)
    grid = jnp.stack([rows_even, rows_odd], axis=2)  # (N, MH+1, 2, MW+1, 2, C)
    n, mh1, _, mw1, _, c = grid.shape
    full = grid.reshape(n, 2 * mh1, 2 * mw1, c)
    return full[:, h % 2:h % 2 + h, w % 2:w % 2 + w]


@jax.custom_vjp
def _signed_max_pool_2d(y: jax.Array, sign: jax.Array) -> jax.Array:
    return _max_pool_choice_2d(y * sign)[0]


def _signed_max_pool_2d_fwd(y, sign):
    out, code = _max_pool_choice_2d(y * sign)
    # Keep the int8 choices as they are: left free, XLA's GPU compiler fused
    # their comparisons into the backward pass, where they read the stem map
    # again.
    out, code = lax.optimization_barrier((out, code))
    return out, (code, y.shape[1], y.shape[2], sign)


def _signed_max_pool_2d_bwd(res, g):
    code, h, w, sign = res
    return _max_pool_bwd_2d(code, g * sign, h, w), jnp.zeros_like(sign)


_signed_max_pool_2d.defvjp(_signed_max_pool_2d_fwd, _signed_max_pool_2d_bwd)


def _stem(conv: "Conv2D", norm: BatchNorm, images: jax.Array, state: eqx.nn.State, *,
          inference: bool, dtype) -> tuple[jax.Array, eqx.nn.State]:
    """max_pool(relu(batch_norm(conv(images)))), with the pool taken first.

    Batch norm is a per-channel affine map a * y + b and ReLU is monotone, so
    the max over a window commutes with both when a >= 0, and turns into a
    min when a < 0: pooling sign(a) * y and then applying |a| (exactly the
    same floating-point values) does the elementwise work and its gradient on
    a quarter of the pixels. The statistics still come from the full map."""
    y = conv(images[..., None], dtype)
    mean, var, state = norm.statistics(y, state, inference=inference)
    a = norm.multiplier(var)
    sign = lax.stop_gradient(jnp.where(a >= 0, 1.0, -1.0))
    pooled = _signed_max_pool(y.astype(jnp.float32), sign)
    out = (pooled - sign * mean) * (a * sign) + norm.offset
    return jax.nn.relu(out).astype(y.dtype), state


class BottleneckBlock(eqx.Module):
    """ResNet v1 bottleneck block: 1x1 (c/4) -> 3x3 (c/4, strided) -> 1x1 (c),
    batch norm after each conv, ReLU between, the last batch norm's scale
    starting at zero, projection shortcut (1x1 conv + batch norm) when asked."""

    convs: tuple[Conv2D, Conv2D, Conv2D]
    norms: tuple[BatchNorm, BatchNorm, BatchNorm]
    shortcut: tuple[Conv2D, BatchNorm] | None

    def __init__(self, n_in: int, channels: int, stride: int, projection: bool,
                 key: jax.Array, axis_name: Hashable | None, gemm: bool = False):
        k0, k1, k2, kp = split(key, 4)
        mid = channels // 4
        self.convs = (Conv2D(n_in, mid, 1, 1, k0), Conv2D(mid, mid, 3, stride, k1, gemm=gemm),
                      Conv2D(mid, channels, 1, 1, k2))
        self.norms = (BatchNorm(mid, axis_name=axis_name), BatchNorm(mid, axis_name=axis_name),
                      BatchNorm(channels, axis_name=axis_name, zero_scale=True))
        self.shortcut = ((Conv2D(n_in, channels, 1, stride, kp),
                          BatchNorm(channels, axis_name=axis_name)) if projection else None)

    def __call__(self, x, state, *, inference: bool, dtype):
        shortcut = x
        if self.shortcut is not None:
            conv, norm = self.shortcut
            shortcut, state = norm(conv(x, dtype), state, inference=inference)
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out, state = norm(conv(out, dtype), state, inference=inference)
            if i < 2:
                out = jax.nn.relu(out)
        return jax.nn.relu(out + shortcut), state


class ResNetEncoder(eqx.Module):
    """The paper's ResNet v1 (bottleneck) without logits."""

    initial_conv: Conv2D
    initial_norm: BatchNorm
    blocks: tuple[BottleneckBlock, ...]
    flatten_superpixels: bool = eqx.field(static=True)

    def __init__(self, blocks_per_group: Sequence[int], channels_per_group: Sequence[int],
                 key: jax.Array, *, flatten_superpixels: bool = False,
                 axis_name: Hashable | None = "batch", strides: Sequence[int] = (1, 2, 2, 2),
                 gemm: bool = False):
        keys = split(key, 1 + sum(blocks_per_group))
        self.initial_conv = Conv2D(1, 64, 7, 2, keys[0], reads_images=True, gemm=gemm)
        self.initial_norm = BatchNorm(64, axis_name=axis_name)
        blocks, n_in, k = [], 64, 1
        for n_blocks, channels, stride in zip(blocks_per_group, channels_per_group, strides):
            for b in range(n_blocks):
                blocks.append(BottleneckBlock(n_in, channels, stride if b == 0 else 1,
                                              b == 0, keys[k], axis_name, gemm))
                n_in, k = channels, k + 1
        self.blocks = tuple(blocks)
        self.flatten_superpixels = flatten_superpixels

    def __call__(self, images, state, *, inference: bool, dtype=jnp.float32):
        x, state = _stem(self.initial_conv, self.initial_norm, images, state,
                         inference=inference, dtype=dtype)
        for block in self.blocks:
            x, state = block(x, state, inference=inference, dtype=dtype)
        if self.flatten_superpixels:
            return x.reshape(x.shape[0], -1), state
        return x.astype(jnp.float32).mean((1, 2)).astype(dtype), state


def resnet_output_hw(image_shape: tuple[int, int], n_groups: int = 4,
                     strides: Sequence[int] = (1, 2, 2, 2)) -> tuple[int, int]:
    """Spatial size of the ResNet's last feature map (SAME padding throughout)."""
    h, w = image_shape
    h, w = _same_out(_same_out(h, 2), 2), _same_out(_same_out(w, 2), 2)  # conv, pool
    for s in strides[:n_groups]:
        h, w = _same_out(h, s), _same_out(w, s)
    return h, w


class LinearEncoder(eqx.Module):
    """Flatten the image, one dense layer to emb_dim."""

    dense: Dense

    def __init__(self, n_pixels: int, emb_dim: int, key: jax.Array):
        self.dense = Dense(n_pixels, emb_dim, key)

    def __call__(self, images, state, *, inference: bool, dtype=jnp.float32):
        return self.dense(images.reshape(images.shape[0], -1), dtype), state


class ConvEncoder(eqx.Module):
    """A cheap CPU encoder (not in the paper): 3x3 stride-2 convs with bias and
    ReLU, then flatten and one dense layer to emb_dim."""

    convs: tuple[Conv2D, ...]
    dense: Dense

    def __init__(self, image_shape: tuple[int, int], channels: Sequence[int], emb_dim: int,
                 key: jax.Array, gemm: bool = False):
        keys = split(key, len(channels) + 1)
        convs, n_in = [], 1
        h, w = image_shape
        for c, k in zip(channels, keys):
            convs.append(Conv2D(n_in, c, 3, 2, k, bias=True, reads_images=not convs, gemm=gemm))
            n_in, h, w = c, _same_out(h, 2), _same_out(w, 2)
        self.convs = tuple(convs)
        self.dense = Dense(h * w * n_in, emb_dim, keys[-1])

    def __call__(self, images, state, *, inference: bool, dtype=jnp.float32):
        x = images[..., None]
        for conv in self.convs:
            x = jax.nn.relu(conv(x, dtype))
        return self.dense(x.reshape(x.shape[0], -1), dtype), state


class EmbeddingEncoder(eqx.Module):
    """Symbolic examples: an integer id -> a row of a table (Haiku's Embed
    default initialiser, truncated normal with std 1)."""

    table: jax.Array

    def __init__(self, vocab: int, emb_dim: int, key: jax.Array):
        self.table = truncated_normal(key, (vocab, emb_dim), 1.0)

    def __call__(self, symbols, state, *, inference: bool, dtype=jnp.float32):
        return self.table[symbols].astype(dtype), state


Encoder = ResNetEncoder | LinearEncoder | ConvEncoder | EmbeddingEncoder


def build_encoder(name: str, *, emb_dim: int, image_shape: tuple[int, ...] | None,
                  key: jax.Array, blocks_per_group: Sequence[int] = (2, 2, 2, 2),
                  channels_per_group: Sequence[int] = (16, 32, 32),
                  conv_channels: Sequence[int] = (32, 32, 32),
                  flatten_superpixels: bool = False, symbolic_vocab: int = 0,
                  axis_name: Hashable | None = "batch", conv_impl: str = "xla") -> Encoder:
    """The example encoder named `name`, producing emb_dim features per item.
    conv_impl: "xla" (XLA's convolution) or "gemm" (see Conv2D)."""
    if conv_impl not in CONV_IMPLS:
        raise EiclError(f"embedding.conv_impl = {conv_impl!r} is not allowed; "
                        f"choose one of: {', '.join(CONV_IMPLS)}")
    gemm = conv_impl == "gemm"
    if name == "embedding":
        if image_shape is not None:
            raise EiclError("embedding.example_encoder = 'embedding' needs symbolic data; "
                            "images need resnet, linear or conv")
        return EmbeddingEncoder(symbolic_vocab, emb_dim, key)
    if image_shape is None or len(image_shape) != 2:
        raise EiclError(f"embedding.example_encoder = {name!r} needs (H, W) images, "
                        f"got image shape {image_shape!r}")
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    if name == "resnet":
        channels = list(channels_per_group)
        if flatten_superpixels:
            # As the original: the last group has emb_dim / 16 channels and the
            # 4 x 4 superpixels of a 105 x 105 image are flattened to emb_dim.
            hw = resnet_output_hw(image_shape, len(blocks_per_group))
            if emb_dim % 16 or math.prod(hw) * (emb_dim // 16) != emb_dim:
                raise EiclError(
                    f"embedding.flatten_superpixels needs emb_dim divisible by 16 and a final "
                    f"4 x 4 feature map (105 x 105 images); got emb_dim {emb_dim} and a "
                    f"{hw[0]} x {hw[1]} map for {image_shape[0]} x {image_shape[1]} images")
            channels.append(emb_dim // 16)
        else:
            channels.append(emb_dim)
        if min(channels) < 4:
            raise EiclError(
                f"resnet group channels {channels} (resnet_channels_per_group, then "
                f"emb_dim{' / 16' if flatten_superpixels else ''}) must all be >= 4: "
                "each bottleneck block narrows to channels / 4")
        return ResNetEncoder(blocks_per_group, channels, key,
                             flatten_superpixels=flatten_superpixels, axis_name=axis_name,
                             gemm=gemm)
    if name == "linear":
        return LinearEncoder(math.prod(image_shape), emb_dim, key)
    if name == "conv":
        return ConvEncoder(image_shape, conv_channels, emb_dim, key, gemm)
    raise EiclError(f"embedding.example_encoder = {name!r} is not allowed; "
                    "choose one of: resnet, linear, conv, embedding")
