"""The ResNet stem's convolution and max pool on a CPU, a few images at a time.

On a CPU the stem is bound by memory, not arithmetic: its one-channel 7 x 7
convolution writes a 64-channel map of every image (the paper's batch: 288 x
53 x 53 x 64 floats, 207 MB), and the batch norm, the pool and their
gradients pass over that map again and again. Here the map never leaves the
cache. For a block of images (about three of 105 x 105 pixels) one pass makes
the kernel taps under every output pixel, the map as a GEMM (taps @ W), and
its signed 3 x 3 stride-2 max pool; the backward pass makes the taps again,
scatters the pool's gradient to the block's map and takes the weight
gradient as a GEMM (taps^T @ dy). Only the pooled map (a quarter of the
pixels) and its int8 window choices reach memory.

Batch norm needs the map's mean and mean square per channel: each block adds
its map's sums of y and y^2 (the same one-pass moments the whole-map form
reduces). Their gradients to W need no map either: the map is linear in the
taps, y = T W, so d(sum y)/dW = T^T 1 = s and d(sum y^2)/dW = 2 T^T T W =
2 G W, from the taps' sums and Gram matrix (kernel taps x kernel taps), made
in the same pass. For binary images G and s are exact integer counts.

The functions take the images of one call, (N, H, W): the model's encoder
passes all the images of a batch. Under a vmap (sweep --stack's runs) a
custom batching rule runs all of them as one flat array in blocks that
never straddle two of the vmapped calls, and returns per-call results, as
vmap requires.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from ..layers import same_out, same_pads
from .pooling import max_pool_bwd_2d, max_pool_choice_2d

# Pixels of stem map per block: three 53 x 53 images. The block's map (2.2 MB)
# and taps (1.7 MB) stay in a CPU's cache; a block of one image pays for more
# loop steps, one of nine falls out of cache.
BLOCK_PIXELS = 9000


def tap_gather(x: jax.Array, kh: int, kw: int, stride: int, *, taps_last: bool) -> jax.Array:
    """The SAME-padded input pixel under each kernel tap at every output
    position of one-channel images x (N, H, W): (N, OH, OW, kh * kw) with
    `taps_last`, else (kh * kw, N, OH, OW).

    The padded images are split into stride x stride phases (every stride-th
    row and column from each offset), so each tap is a unit-stride window of
    one phase, and one gather reads all kh * kw windows: XLA's CPU backend
    stacked 49 strided views at a third of memory speed, and writing them into
    a zeroed buffer one by one still cost a full extra pass."""
    n, h, wd = x.shape
    oh, ow = same_out(h, stride), same_out(wd, stride)
    top, left = same_pads(h, kh, stride)[0], same_pads(wd, kw, stride)[0]
    rows = -(-((oh - 1) * stride + kh) // stride) * stride  # padded size, a multiple of stride
    cols = -(-((ow - 1) * stride + kw) // stride) * stride
    xp = jnp.pad(x, ((0, 0), (top, rows - h - top), (left, cols - wd - left)))
    phases = xp.reshape(n, rows // stride, stride, cols // stride, stride)
    phases = phases.transpose(2, 4, 0, 1, 3).reshape(stride * stride, n, rows // stride,
                                                     cols // stride)
    starts = jnp.asarray([[(a % stride) * stride + b % stride, 0, a // stride, b // stride]
                          for a in range(kh) for b in range(kw)], jnp.int32)
    dims = lax.GatherDimensionNumbers(offset_dims=(0, 1, 2) if taps_last else (1, 2, 3),
                                      collapsed_slice_dims=(0,), start_index_map=(0, 1, 2, 3))
    return lax.gather(phases, starts, dims, slice_sizes=(1, n, oh, ow),
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _block_size(group: int, pixels_per_image: int) -> int:
    """The most images per block, dividing `group` (the images of one call), whose
    map stays within BLOCK_PIXELS (at least one)."""
    fits = [d for d in range(1, group + 1)
            if group % d == 0 and d * pixels_per_image <= BLOCK_PIXELS]
    return max(fits, default=1)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    return x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _forward(x: jax.Array, w: jax.Array, sign: jax.Array, group: int, stride: int,
             stats: bool) -> tuple[jax.Array, ...]:
    """Blocks of images x (N, H, W), N a multiple of `group`: the pooled map
    of sign * conv(x, w) (N, MH, MW, C) and its int8 window choices; with
    `stats` also, per group of `group` images, the map's sums of y and y^2
    (N / group, C) and the taps' Gram matrix and sums (N / group, k, k) and
    (N / group, k); w is (kh, kw, 1, C), k = kh * kw."""
    kh, kw, _, c = w.shape
    n, h, wd = x.shape
    oh, ow = same_out(h, stride), same_out(wd, stride)
    block = _block_size(group, oh * ow)
    wm = w.reshape(kh * kw, c)

    def step(_, xb):
        taps = tap_gather(xb, kh, kw, stride, taps_last=True).reshape(-1, kh * kw)
        y = taps @ wm
        pooled, code = max_pool_choice_2d(y.reshape(block, oh, ow, c) * sign)
        if not stats:
            return None, (pooled, code)
        gram = lax.dot_general(taps, taps, (((0,), (0,)), ((), ())))
        return None, (pooled, code, y.sum(0), jnp.square(y).sum(0), gram, taps.sum(0))

    _, out = lax.scan(step, None, _blocks(x, block))
    pooled, code = (a.reshape(n, *a.shape[2:]) for a in out[:2])
    if not stats:
        return pooled, code
    per_group = lambda a: a.reshape(n // group, group // block, *a.shape[1:]).sum(1)  # noqa: E731
    return (pooled, code) + tuple(per_group(a) for a in out[2:])


def _backward(x: jax.Array, code: jax.Array, g: jax.Array, kernel: tuple[int, int],
              group: int, stride: int) -> jax.Array:
    """The weight gradient per group of `group` images, (N / group, kh, kw, 1, C),
    of the pooled map whose gradient is g (N, MH, MW, C) (the sign applied)."""
    (kh, kw), c = kernel, g.shape[-1]
    n, h, wd = x.shape
    oh, ow = same_out(h, stride), same_out(wd, stride)
    block = _block_size(group, oh * ow)

    def step(_, blocks):
        xb, cb, gb = blocks
        dy = max_pool_bwd_2d(cb, gb, oh, ow).reshape(-1, c)
        taps = tap_gather(xb, kh, kw, stride, taps_last=True).reshape(-1, kh * kw)
        return None, lax.dot_general(taps, dy, (((0,), (0,)), ((), ())))

    _, dw = lax.scan(step, None, (_blocks(x, block), _blocks(code, block), _blocks(g, block)))
    return dw.reshape(n // group, group // block, kh, kw, 1, c).sum(1)


def _flat_rule(one, flat_call, per_image: int):
    """A custom_vmap rule: batched images (B, L, H, W) and the other
    per-image arguments among the first `per_image` run as B * L flat ones in
    groups of L, per-call results come back batched. Anything else batched
    (per-run weights) falls back to a plain vmap of `one`."""
    def rule(axis_size, in_batched, x, *rest):
        if not all(in_batched[:per_image]) or any(in_batched[per_image:]):
            axes = tuple(0 if b else None for b in in_batched)
            out = jax.vmap(one, in_axes=axes)(x, *rest)
            return out, jax.tree_util.tree_map(lambda _: True, out)
        b, length = x.shape[:2]
        out = flat_call(x.reshape(b * length, *x.shape[2:]), *rest, group=length, batch=b)
        return out, jax.tree_util.tree_map(lambda _: True, out)
    return rule


@functools.cache
def _kernels(stride: int, stats: bool, kernel: tuple[int, int]):
    """The forward and backward kernels (custom_vmap functions) of one stem
    geometry, made once: their batching rules run the flat loops."""
    def forward_one(x, w, sign):
        out = _forward(x, w, sign, x.shape[0], stride, stats)
        return out[:2] + tuple(a[0] for a in out[2:])

    def forward_flat(x, w, sign, *, group, batch):
        out = _forward(x, w, sign, group, stride, stats)
        return tuple(a.reshape(batch, group, *a.shape[1:]) for a in out[:2]) + out[2:]

    # The backward kernel needs only the kernel's shape (static), not the
    # weights: its arguments are all per-image, so the flat rule applies.
    def backward_one(x, code, g):
        return _backward(x, code, g, kernel, x.shape[0], stride)[0]

    def backward_flat(x, code, g, *, group, batch):
        flat = lambda a: a.reshape(batch * group, *a.shape[2:])  # noqa: E731
        return _backward(x, flat(code), flat(g), kernel, group, stride)

    forward = custom_vmap(forward_one)
    forward.def_vmap(_flat_rule(forward_one, forward_flat, 1))
    backward = custom_vmap(backward_one)
    backward.def_vmap(_flat_rule(backward_one, backward_flat, 3))
    return forward, backward


def conv_pool(x: jax.Array, w: jax.Array, sign: jax.Array, stride: int, stats: bool
              ) -> tuple[jax.Array, ...]:
    """(pooled, [y_sum, y_sq_sum]): the 3 x 3 stride-2 SAME max pool of
    sign * y, y the SAME convolution of one call's images x (N, H, W)
    with w (kh, kw, 1, C) at `stride`; with `stats` y's per-channel sums of
    y and y^2 over the N images. Differentiable in w only: the images are
    data, the sign is constant."""
    return _conv_pool(x, w, sign, stride, stats, tuple(w.shape[:2]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_pool(x, w, sign, stride, stats, kernel):
    return _conv_pool_fwd(x, w, sign, stride, stats, kernel)[0]


def _conv_pool_fwd(x, w, sign, stride, stats, kernel):
    out = _kernels(stride, stats, kernel)[0](x, w, sign)
    return (out[0],) + out[2:4], (x, out[1], sign, w) + out[4:]


def _conv_pool_bwd(stride, stats, kernel, res, cotangents):
    x, code, sign, w = res[:4]
    dw = _kernels(stride, stats, kernel)[1](x, code, cotangents[0] * sign)
    if stats:
        gram, sums = res[4:]
        d_sum, d_sq = cotangents[1:]
        wm = w.reshape(-1, w.shape[-1])
        dw = dw + (jnp.outer(sums, d_sum) + 2.0 * (gram @ wm) * d_sq).reshape(dw.shape)
    return jnp.zeros_like(x), dw, jnp.zeros_like(sign)


_conv_pool.defvjp(_conv_pool_fwd, _conv_pool_bwd)


def pool_and_moments(images: jax.Array, w: jax.Array, sign: jax.Array, stride: int,
                     stats: bool, conv=None, out_dtype=jnp.float32
                     ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(pooled, mean, mean square): the signed max pool of the convolution
    of one call's images (N, H, W) with w (kh, kw, 1, C), and with
    `stats` the map's per-channel mean and mean square over the N images
    (None without), computed in float32; the pooled map is returned as
    `out_dtype`. `conv`: the conv_pool to run (this module's by default;
    stem_fused passes its kernels', which store it so themselves)."""
    conv = conv_pool if conv is None else conv
    out = conv(images.astype(jnp.float32), w.astype(jnp.float32), sign.astype(jnp.float32),
               stride, stats)
    pooled = out[0].astype(out_dtype)
    if not stats:
        return pooled, None, None
    pixels = images.shape[0] * same_out(images.shape[1], stride) * same_out(images.shape[2], stride)
    return pooled, out[1] / pixels, out[2] / pixels
