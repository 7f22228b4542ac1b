"""The convolutions encoders.Conv2D computes with: XLA's, as im2col GEMMs,
and for the one-channel images themselves, with a weight gradient written as
one GEMM (no gradient flows back to data).

The same functions as XLA's convolution, computed another way where that is
faster: under `sweep --stack` vmap turns XLA's convolution into a grouped one
(one group per run), while a product becomes a batched GEMM; and XLA's CPU
backend computes the weight gradient of a one-input-channel convolution
slowly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ..layers import same_out, same_pads
from .stem_blocked import tap_gather

_NHWC = ("NHWC", "HWIO", "NHWC")


def pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
    """A 1x1 convolution: (..., in) @ (in, out) with the pixels flattened
    first. Under vmap over stacked runs the weight gradient is a batched dot,
    and XLA's GPU layouts copied dy to channels-major (a full extra pass each)
    when it contracted over the separate image, row and column axes."""
    return (x.reshape(-1, w.shape[0]) @ w).reshape(*x.shape[:-1], w.shape[1])


def conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_NHWC)


def conv_gemm(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """conv as im2col: the kh * kw strided windows of the SAME-padded input,
    side by side on the channel axis, times the kernel as a (kh * kw * in, out)
    matrix. Costs kh * kw copies of the input; the ResNet's 3 x 3 convolutions
    run on 4-16 channels, so those copies are small."""
    kh, kw, n_in, n_out = w.shape
    n, h, wd, _ = x.shape
    oh, ow = same_out(h, stride), same_out(wd, stride)
    xp = jnp.pad(x, ((0, 0), same_pads(h, kh, stride), same_pads(wd, kw, stride), (0, 0)))
    windows = [lax.slice(xp, (0, a, b, 0), (n, a + (oh - 1) * stride + 1,
                                            b + (ow - 1) * stride + 1, n_in),
                         (1, stride, stride, 1))
               for a in range(kh) for b in range(kw)]
    return jnp.concatenate(windows, axis=-1) @ w.reshape(kh * kw * n_in, n_out)


def image_taps(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """(kh * kw, N * OH * OW): the taps of one-channel NHWC images, one
    contiguous row per tap (see stem_blocked.tap_gather)."""
    return tap_gather(x[..., 0], kh, kw, stride, taps_last=False).reshape(kh * kw, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def image_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """SAME convolution of one-channel NHWC data, for the ResNet's stem.

    The forward pass is XLA's convolution. Its weight gradient, which XLA's
    CPU backend computes slowly for one input channel (it was most of the
    paper model's step), is one GEMM: taps (k*k, pixels) @ dy (pixels, out).
    The images are data, never trained, so no gradient flows back to them
    (the cotangent returned for x is zero)."""
    return conv(x, w, stride)


def _image_conv_fwd(x, w, stride):
    return conv(x, w, stride), (x, w)


def _image_conv_bwd(stride, res, dy):
    x, w = res
    kh, kw, _, n_out = w.shape
    taps = image_taps(x, kh, kw, stride).astype(dy.dtype)
    dw = (taps @ dy.reshape(-1, n_out)).reshape(kh, kw, 1, n_out)
    return jnp.zeros_like(x), dw.astype(w.dtype)


image_conv.defvjp(_image_conv_fwd, _image_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def image_conv_gemm(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """image_conv with the forward pass as a GEMM too, over the same taps:
    y = taps^T (pixels, k*k) @ w (k*k, out). The taps are kept for the
    backward pass instead of being gathered twice."""
    return _image_conv_gemm_fwd(x, w, stride)[0]


def _image_conv_gemm_fwd(x, w, stride):
    kh, kw, _, n_out = w.shape
    n, h, wd, _ = x.shape
    taps = image_taps(x, kh, kw, stride).astype(w.dtype)
    y = lax.dot_general(taps, w.reshape(kh * kw, n_out), (((0,), (0,)), ((), ())))
    return y.reshape(n, same_out(h, stride), same_out(wd, stride), n_out), (x, taps, w)


def _image_conv_gemm_bwd(stride, res, dy):
    x, taps, w = res
    kh, kw, _, n_out = w.shape
    dw = (taps.astype(dy.dtype) @ dy.reshape(-1, n_out)).reshape(kh, kw, 1, n_out)
    return jnp.zeros_like(x), dw.astype(w.dtype)


image_conv_gemm.defvjp(_image_conv_gemm_fwd, _image_conv_gemm_bwd)
