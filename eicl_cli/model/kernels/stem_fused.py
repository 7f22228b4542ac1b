"""The ResNet stem's convolution, max pool and map moments as two GPU kernels.

On a GPU the stem is bound by memory: its 64-channel map (288 x 53 x 53 x 64
floats per paper batch, 207 MB; eight times that for `sweep --stack 8`) is
written by the convolution and read back by the moments, the pool and their
gradients, about half of the paper step's memory traffic on an H100 target.
These Pallas (Triton) kernels never write the map. The forward kernel takes
a tile of pooled positions, gathers the kernel taps under each of the nine
elements of their 3 x 3 windows straight from the image, makes those map
values as a matrix product (taps @ W, on tensor cores), and keeps their
signed maximum and its window element (int8). Each map pixel is one window's
"home" element (window rows and columns {1, 2} for an odd map size, {0, 1}
for an even one), and the home elements add the map's sums of y and y^2 for
batch norm. The backward kernel gathers the taps again and sums taps^T @ g
over the nine elements, g the pooled gradient where that element was chosen,
plus, at home elements, the moments' gradient d(sum) + 2 y d(sum sq) with y
made once more. Memory traffic: the images, the pooled map and its choices.

Same values, choices (ties included) and gradients as the other forms up to
the matrix products' rounding: the kernels' dots use the platform's default
float32 precision (TF32 tensor cores on recent NVIDIA GPUs, as XLA's own
convolutions there). Off a GPU they run in Pallas's interpreter, which is
how the tests check them.

The functions take the images of one call (N, H, W), as the model's encoder
passes a whole batch's; vmap (sweep --stack's runs) becomes an extra grid
axis of the kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import stem_blocked
from ..layers import same_out, same_pads
from .pooling import rule3

# Pooled positions per tile: a (TILE, taps) @ (taps, C) product per window
# element keeps the accumulators of three elements and two column maxima in
# registers at 4 warps.
TILE = 32
# Tile ranges one backward program sums before writing its weight gradient:
# fewer mean more partial gradients to add up, more mean fewer programs.
BACKWARD_SPLITS = 2


@dataclass(frozen=True)
class Geometry:
    """Static shapes of one image's stem: the image (h, w), the kernel
    (kh, kw) and stride; derived, the map (oh, ow), the pooled map (mh, mw),
    the taps padded to a power of two and the tiles of pooled positions.
    Pooled row i's window starts at map row 2i - 1 for an odd oh (the -inf
    padding goes in front), 2i for an even one; columns alike."""

    h: int
    w: int
    kh: int
    kw: int
    stride: int

    @property
    def oh(self) -> int:
        return same_out(self.h, self.stride)

    @property
    def ow(self) -> int:
        return same_out(self.w, self.stride)

    @property
    def mh(self) -> int:
        return same_out(self.oh, 2)

    @property
    def mw(self) -> int:
        return same_out(self.ow, 2)

    @property
    def taps(self) -> int:
        return pl.next_power_of_2(self.kh * self.kw)

    @property
    def tiles(self) -> int:
        """Tiles of pooled positions, a multiple of BACKWARD_SPLITS."""
        per_split = -(-self.mh * self.mw // (TILE * BACKWARD_SPLITS))
        return per_split * BACKWARD_SPLITS


def _tile_taps(x_ref, g: Geometry, q, a: int, b: int):
    """The taps (TILE, g.taps) under window element (a, b) of pooled
    positions q (TILE, 1), zero outside the image and past kh * kw, and
    whether that element is a map pixel (TILE, 1)."""
    qi, qj = q // g.mw, q % g.mw
    r = 2 * qi - g.oh % 2 + a
    c = 2 * qj - g.ow % 2 + b
    valid = (q < g.mh * g.mw) & (r >= 0) & (r < g.oh) & (c >= 0) & (c < g.ow)
    k = lax.broadcasted_iota(jnp.int32, (1, g.taps), 1)
    rows = g.stride * r + k // g.kw - same_pads(g.h, g.kh, g.stride)[0]
    cols = g.stride * c + k % g.kw - same_pads(g.w, g.kw, g.stride)[0]
    inside = valid & (k < g.kh * g.kw) & (rows >= 0) & (rows < g.h) & (cols >= 0) & (cols < g.w)
    taps = plgpu.load(x_ref.at[jnp.clip(rows, 0, g.h - 1), jnp.clip(cols, 0, g.w - 1)],
                      mask=inside, other=0.0)
    return taps, valid


def _home(g: Geometry, a: int, b: int) -> bool:
    """Whether window element (a, b) is its map pixel's one home window."""
    return a in (g.oh % 2, g.oh % 2 + 1) and b in (g.ow % 2, g.ow % 2 + 1)


def _forward_kernel(x_ref, w_ref, sign_ref, pooled_ref, code_ref, *stat_refs, g: Geometry,
                    precision):
    q = pl.program_id(1) * TILE + lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)
    w, sign = w_ref[...], sign_ref[...]
    y_sum = y_sq = None
    best, row_of = [], []
    for b in range(3):
        column = []
        for a in range(3):
            taps, valid = _tile_taps(x_ref, g, q, a, b)
            y = jnp.dot(taps, w, precision=precision)
            if stat_refs and _home(g, a, b):
                y0 = jnp.where(valid, y, 0.0)
                s, s2 = y0.sum(0), (y0 * y0).sum(0)
                y_sum, y_sq = (s, s2) if y_sum is None else (y_sum + s, y_sq + s2)
            column.append(jnp.where(valid, y * sign, -jnp.inf))
        best.append(jnp.maximum(jnp.maximum(column[0], column[1]), column[2]))
        row_of.append(rule3(g.oh)(*column))
    col = rule3(g.ow)(*best)
    row = jnp.where(col == 0, row_of[0], jnp.where(col == 1, row_of[1], row_of[2]))
    pooled = jnp.maximum(jnp.maximum(best[0], best[1]), best[2])
    pooled_ref[...] = pooled.astype(pooled_ref.dtype)
    code_ref[...] = (3 * row + col).astype(jnp.int8)
    if stat_refs:
        stat_refs[0][...] = y_sum
        stat_refs[1][...] = y_sq


def _backward_kernel(x_ref, w_ref, code_ref, g_ref, *refs, g: Geometry, precision):
    *moment_refs, dw_ref = refs
    per_split = g.tiles // BACKWARD_SPLITS
    first = pl.program_id(1) * per_split  # read outside the loop: the interpreter needs it so
    w = w_ref[...]
    if moment_refs:
        d_sum, d_sq = moment_refs[0][...], moment_refs[1][...]

    def tile(j, dw):
        t = first + j
        q = t * TILE + lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)
        code = code_ref[pl.ds(pl.multiple_of(t * TILE, TILE), TILE), :]
        # The gradient comes unpadded (padding it was a pass over it): a
        # masked gather, so the last tile reads nothing past its end.
        channel = lax.broadcasted_iota(jnp.int32, (1, g_ref.shape[-1]), 1)
        grad = plgpu.load(g_ref.at[jnp.minimum(q, g.mh * g.mw - 1), channel],
                          mask=(q < g.mh * g.mw) & (channel >= 0), other=0.0
                          ).astype(jnp.float32)
        for a in range(3):
            for b in range(3):
                taps, valid = _tile_taps(x_ref, g, q, a, b)
                dy = jnp.where(code == 3 * a + b, grad, 0.0)
                if moment_refs and _home(g, a, b):
                    y = jnp.dot(taps, w, precision=precision)
                    dy = dy + jnp.where(valid, d_sum + 2.0 * y * d_sq, 0.0)
                dw = dw + lax.dot_general(taps, dy, (((0,), (0,)), ((), ())),
                                          precision=precision)
        return dw

    dw_ref[...] = lax.fori_loop(0, per_split, tile, jnp.zeros(dw_ref.shape, jnp.float32))


_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)


def _precision() -> lax.Precision | None:
    """Full float32 products where the process asks for them
    (jax_default_matmul_precision), as XLA's convolutions would use; else
    the default (TF32 on tensor cores)."""
    wanted = jax.config.jax_default_matmul_precision
    return lax.Precision.HIGHEST if wanted in ("highest", "float32", "F32_F32_F32") else None


def _whole(*shape: int) -> pl.BlockSpec:
    """The same whole (small) array for every program of a (image, tile) grid."""
    return pl.BlockSpec(shape, lambda i, t: (0,) * len(shape))


def _per_image(*shape: int) -> pl.BlockSpec:
    """Program (i, t)'s image's slice of an array with a leading image axis."""
    return pl.BlockSpec((None, *shape), lambda i, t: (i,) + (0,) * len(shape))


def _forward(x, wm, sign, g: Geometry, stats: bool, out_dtype, interpret: bool):
    n, c = x.shape[0], wm.shape[1]
    rows = g.tiles * TILE
    out_shape = [jax.ShapeDtypeStruct((n, rows, c), out_dtype),
                 jax.ShapeDtypeStruct((n, rows, c), jnp.int8)]
    out_specs = [pl.BlockSpec((None, TILE, c), lambda i, t: (i, t, 0))] * 2
    if stats:
        out_shape += [jax.ShapeDtypeStruct((n, g.tiles, c), jnp.float32)] * 2
        out_specs += [pl.BlockSpec((None, None, c), lambda i, t: (i, t, 0))] * 2
    return pl.pallas_call(
        functools.partial(_forward_kernel, g=g, precision=_precision()), grid=(n, g.tiles),
        in_specs=[_per_image(g.h, g.w), _whole(g.taps, c), _whole(1, c)],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=_PARAMS, name="stem_forward",
    )(x, wm, sign.reshape(1, c))


def _backward(x, wm, code, grad, moments, g: Geometry, interpret: bool):
    n, c = x.shape[0], wm.shape[1]
    return pl.pallas_call(
        functools.partial(_backward_kernel, g=g, precision=_precision()), grid=(n, BACKWARD_SPLITS),
        in_specs=[_per_image(g.h, g.w), _whole(g.taps, c), _per_image(g.tiles * TILE, c),
                  _per_image(g.mh * g.mw, c)] + [_whole(1, c)] * len(moments),
        out_specs=pl.BlockSpec((None, None, g.taps, c), lambda i, s: (i, s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((n, BACKWARD_SPLITS, g.taps, c), jnp.float32),
        interpret=interpret, compiler_params=_PARAMS, name="stem_backward",
    )(x, wm, code, grad, *(m.reshape(1, c) for m in moments))


# Window elements whose (TILE, taps) @ (taps, C) product each kernel makes
# per tile: all nine forward; nine for the weight gradient backward, plus
# the four home elements' map values again where the moments have a gradient.
PRODUCTS = {"stem_forward": 9, "stem_backward": 9, "stem_backward_moments": 13}


def kernel_flops(name: str, rows: int, taps: int, channels: int, moments: bool) -> int:
    """Multiply-adds x 2 of one launch of kernel `name` ("stem_forward" or
    "stem_backward") over `rows` pooled positions of all its images (padded
    to whole tiles): what XLA's program text cannot show of a Pallas call
    (benchmarks/gpu/gpu_program.py counts them with this)."""
    key = name + ("_moments" if name == "stem_backward" and moments else "")
    return 2 * PRODUCTS[key] * rows * taps * channels


def _geometry(x: jax.Array, w: jax.Array, stride: int) -> Geometry:
    return Geometry(x.shape[1], x.shape[2], w.shape[0], w.shape[1], stride)


def _weight_matrix(w: jax.Array, g: Geometry) -> jax.Array:
    wm = w.reshape(g.kh * g.kw, w.shape[-1]).astype(jnp.float32)
    return jnp.pad(wm, ((0, g.taps - g.kh * g.kw), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def conv_pool(x: jax.Array, w: jax.Array, sign: jax.Array, stride: int, stats: bool,
              out_dtype, interpret: bool) -> tuple[jax.Array, ...]:
    """(pooled, [y_sum, y_sq_sum]) as stem_blocked.conv_pool: the 3 x 3
    stride-2 SAME max pool of sign * y, y the SAME convolution of one
    call's images x (N, H, W) with w (kh, kw, 1, C); with `stats` y's
    per-channel sums of y and y^2. Differentiable in w only. The products,
    the maximum and the sums are float32; the pooled map is stored as
    `out_dtype` (its gradient comes in that dtype too). Rounding commutes
    with the maximum, so a bfloat16 pooled map holds the same values as the
    pool of a bfloat16 map, at half the memory traffic."""
    return _conv_pool_fwd(x, w, sign, stride, stats, out_dtype, interpret)[0]


def _conv_pool_fwd(x, w, sign, stride, stats, out_dtype, interpret):
    g = _geometry(x, w, stride)
    wm = _weight_matrix(w, g)
    out = _forward(x, wm, sign, g, stats, out_dtype, interpret)
    pooled = out[0][:, :g.mh * g.mw].reshape(x.shape[0], g.mh, g.mw, -1)
    sums = tuple(s.sum((0, 1)) for s in out[2:])
    return (pooled,) + sums, (x, w, out[1], sign)


def _conv_pool_bwd(stride, stats, out_dtype, interpret, res, cotangents):
    x, w, code, sign = res
    g = _geometry(x, w, stride)
    wm = _weight_matrix(w, g)
    n, c = x.shape[0], w.shape[-1]
    # sign is +-1: multiplying in the gradient's own dtype is exact and keeps
    # a bfloat16 gradient at half the bytes on its way into the kernel.
    grad = (cotangents[0] * sign.astype(cotangents[0].dtype)).reshape(n, g.mh * g.mw, c)
    dw = _backward(x, wm, code, grad, cotangents[1:], g, interpret).sum((0, 1))
    return (jnp.zeros_like(x), dw[:g.kh * g.kw].reshape(w.shape).astype(w.dtype),
            jnp.zeros_like(sign))


conv_pool.defvjp(_conv_pool_fwd, _conv_pool_bwd)


def pool_and_moments(images: jax.Array, w: jax.Array, sign: jax.Array, stride: int,
                     stats: bool, out_dtype=jnp.float32, interpret: bool = False
                     ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(pooled, mean, mean square) as stem_blocked.pool_and_moments, from the
    kernels (run by Pallas's interpreter with `interpret`)."""
    def conv(x, w, sign, stride, stats):
        return conv_pool(x, w, sign, stride, stats, jnp.dtype(out_dtype), interpret)
    return stem_blocked.pool_and_moments(images, w, sign, stride, stats, conv=conv,
                                         out_dtype=out_dtype)
