"""The 3 x 3 stride-2 SAME max pool of the ResNet's stem, and its gradient.

lax.reduce_window's gradient (select-and-scatter) is much slower on a CPU
than these forms, which keep an int8 choice per window and build the
gradient from it. Two forms of the same values and gradients: rows then
columns through strided views (the whole-map stem's on a CPU, where the
blocked stem does not apply), and all nine window elements at once (a GPU's,
and the blocked stem's, see stem_blocked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ..layers import same_out

def _slice(a: jax.Array, start: int, stop: int, axis: int, step: int = 1) -> jax.Array:
    return lax.slice_in_dim(a, start, stop, step, axis)


def rule3(n: int):
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
                           rule3(n)(a, b, c)))
        el, ol = _slice(even, m - 1, m, axis), _slice(odd, m - 2, m - 1, axis)
        pieces.append((jnp.maximum(el, ol), jnp.where(el >= ol, 1, 0)))
    else:  # even size: windows (x[2i], x[2i+1], x[2i+2]), the last one (x[n-2], x[n-1])
        if m > 1:
            a, b, c = _slice(even, 0, m - 1, axis), _slice(odd, 0, m - 1, axis), \
                _slice(even, 1, m, axis)
            pieces.append((jnp.maximum(jnp.maximum(a, b), c),
                           rule3(n)(a, b, c)))
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


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3 x 3 stride-2 SAME max pool (padding counts as -inf), NHWC.

    Separable (rows, then columns) maxima of strided views: lax.reduce_window's
    gradient (select-and-scatter) is much slower on CPU. Ties split the
    gradient where select-and-scatter picks one; tied inputs of a stem feature
    map come from identical image patches, so the weight gradient is the same.
    """
    return _max3_s2(_max3_s2(x, 1), 2)


def signed_max_pool(y: jax.Array, sign: jax.Array) -> jax.Array:
    """max_pool_3x3_s2(y * sign) for a per-channel sign of +-1.

    The sign multiplies the incoming gradient at the pooled resolution
    (a quarter of the pixels) rather than the outgoing one: written as
    y * sign, XLA kept the per-channel sign broadcast to the whole stem map
    (288 x 53 x 53 x 64 floats for the paper's batch) between the forward
    and backward passes.

    Two forms of the same values and gradients, picked when the step is
    compiled: on a CPU, rows then columns through strided views, as
    max_pool_3x3_s2 (padding the map cost a pass there); elsewhere all nine
    window elements of the -inf-padded map at once, which XLA fuses into one
    pass forward and one backward, batch norm's gradient included, so the
    map is read fewer times than by the separable form's two passes."""
    return lax.platform_dependent(y, sign, cpu=signed_max_pool_separable,
                                  default=signed_max_pool_2d)


@jax.custom_vjp
def signed_max_pool_separable(y: jax.Array, sign: jax.Array) -> jax.Array:
    return max_pool_3x3_s2(y * sign)


def _signed_max_pool_fwd(y, sign):
    rows, row_code = _max3_choice(y * sign, 1)
    out, col_code = _max3_choice(rows, 2)
    return out, (row_code, col_code, y.shape[1], rows.shape[2], sign)


def _signed_max_pool_bwd(res, g):
    row_code, col_code, h, w, sign = res
    (g_rows,) = _max3_bwd(2, (col_code, w), g * sign)
    (dy,) = _max3_bwd(1, (row_code, h), g_rows)
    return dy, jnp.zeros_like(sign)


signed_max_pool_separable.defvjp(_signed_max_pool_fwd, _signed_max_pool_bwd)


def _pad_axes(x: jax.Array, pads: dict[int, tuple[int, int]], value: float = 0.0) -> jax.Array:
    widths = [pads.get(axis, (0, 0)) for axis in range(x.ndim)]
    return jnp.pad(x, widths, constant_values=value)


def max_pool_choice_2d(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 3 x 3 stride-2 SAME max pool of NHWC `x` and the window element
    holding each maximum, int8 3a + b for row a and column b of the window,
    with _max3_choice's choices (rule3): each column's best row first, then
    the best of those columns. The -inf padding puts the edge windows under the
    interior's rule (one -inf in front along an axis of odd size), which
    makes the same choices as _max3_choice's edge cases."""
    (h, w), (mh, mw) = x.shape[1:3], (same_out(x.shape[1], 2), same_out(x.shape[2], 2))
    xp = _pad_axes(x, {1: (h % 2, 2 * mh + 1 - h - h % 2), 2: (w % 2, 2 * mw + 1 - w - w % 2)},
                   -jnp.inf)
    rule_h, rule_w = rule3(h), rule3(w)
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


def max_pool_bwd_2d(code: jax.Array, g: jax.Array, h: int, w: int) -> jax.Array:
    """The gradient of max_pool_choice_2d's maximum: each window's gradient
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
def signed_max_pool_2d(y: jax.Array, sign: jax.Array) -> jax.Array:
    return max_pool_choice_2d(y * sign)[0]


def _signed_max_pool_2d_fwd(y, sign):
    out, code = max_pool_choice_2d(y * sign)
    # Keep the int8 choices as they are: left free, XLA's GPU compiler fused
    # their comparisons into the backward pass, where they read the stem map
    # again.
    out, code = lax.optimization_barrier((out, code))
    return out, (code, y.shape[1], y.shape[2], sign)


def _signed_max_pool_2d_bwd(res, g):
    code, h, w, sign = res
    return max_pool_bwd_2d(code, g * sign, h, w), jnp.zeros_like(sign)


signed_max_pool_2d.defvjp(_signed_max_pool_2d_fwd, _signed_max_pool_2d_bwd)
