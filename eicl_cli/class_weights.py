"""Class frequencies (docs/experiment.md §3): the Zipf weights over the rare +
common classes and the weights of the pools drawn from them.

Without JAX or the config, so that config validation can refuse a Zipf
exponent the sequence generator cannot use, from the very arrays the
generator will draw with.
"""

from __future__ import annotations

import math

import numpy as np

# The largest share of a weighted pool's draws one class may take. A
# no-support sequence draws its context from the pool without the query's
# class and redraws, by rejection, the rare draw that float round-off lands
# on the query's class: the other classes must keep enough of the draws for
# that to end after a few tries, and when the top class takes all of them
# in float64 it never ends.
MAX_SHARE = 0.999

# Pool names as the generator and its messages call them.
POOL_LABELS = {"zipfian": "zipfian (rare + common)", "rare": "rare", "common": "common"}


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """w_j proportional to 1 / (n - j) ** exponent, j = 0..n-1 (the last is the most frequent)."""
    if n == 0:
        return np.zeros(0)
    w = 1.0 / np.arange(n, 0, -1, dtype=np.float64) ** exponent
    return w / w.sum()


def normalised(w: np.ndarray) -> np.ndarray:
    return w / w.sum() if w.size else w


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n) if n else np.zeros(0)


def pool_weights(n_rare: int, n_common: int, exponent: float,
                 zipf_for_common_rare: bool) -> dict[str, np.ndarray]:
    """The weights of the zipfian (rare then common), rare and common pools."""
    zipf = zipf_weights(n_rare + n_common, exponent)
    if zipf_for_common_rare:
        rare, common = normalised(zipf[:n_rare]), normalised(zipf[n_rare:])
    else:
        rare, common = uniform(n_rare), uniform(n_common)
    return {"zipfian": zipf, "rare": rare, "common": common}


def too_steep(n_rare: int, n_common: int, exponent: float,
              zipf_for_common_rare: bool) -> tuple[str, float] | None:
    """(pool, top share) for the first pool of two or more classes whose most
    frequent class takes more than MAX_SHARE of its draws (share NaN: its
    weights underflow to nothing in float64); None when every pool is usable."""
    if exponent == 0:
        return None
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        pools = pool_weights(n_rare, n_common, exponent, zipf_for_common_rare)
    for name, w in pools.items():
        if w.size < 2:
            continue
        share = float(w.max()) if np.isfinite(w).all() else math.nan
        if not share <= MAX_SHARE:
            return name, share
    return None


def steepest_exponent(n_rare: int, n_common: int, zipf_for_common_rare: bool) -> float:
    """The largest exponent (rounded down to 0.01) that too_steep accepts."""
    lo, hi = 0.0, 1.0
    while too_steep(n_rare, n_common, hi, zipf_for_common_rare) is None and hi < 2.0 ** 30:
        lo, hi = hi, 2 * hi
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        if too_steep(n_rare, n_common, mid, zipf_for_common_rare) is None:
            lo = mid
        else:
            hi = mid
    return math.floor(lo * 100) / 100
