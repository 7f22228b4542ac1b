"""The class split of docs/experiment.md §3: rare / common / holdout lists and Zipf weights.

The permutation must match the original code bit for bit (same seed, same
classes), so it is drawn with exactly the call the original makes; everything
downstream (pools, labels, sequences) only reads the arrays built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..class_weights import pool_weights, uniform
from ..config import ClassesConfig
from ..errors import EiclError


@dataclass(frozen=True)
class ClassSplit:
    """Dataset class indices per role, and the sampling weights of each pool.

    `zipf` is over `non_holdout` (rare then common), by list position; the
    pool weights `rare_weights` / `common_weights` are uniform unless
    use_zipf_for_common_rare, and `holdout_weights` is always uniform.
    """

    order: np.ndarray  # (C,) int32: the permuted class list
    rare: np.ndarray  # (n_rare,) int32
    common: np.ndarray  # (n_common,) int32
    holdout: np.ndarray  # (n_holdout,) int32
    non_holdout: np.ndarray  # (n_rare + n_common,) int32: rare then common
    zipf: np.ndarray  # (n_rare + n_common,) float64, sums to 1
    rare_weights: np.ndarray  # (n_rare,) float64, sums to 1
    common_weights: np.ndarray  # (n_common,) float64, sums to 1
    holdout_weights: np.ndarray  # (n_holdout,) float64, sums to 1


def permute_classes(n: int, seed: int, group: int = 0) -> np.ndarray:
    """The class order of docs/experiment.md §3: a seeded permutation of 0..n-1, or of the
    n/group blocks of `group` consecutive classes when group > 1."""
    rng = np.random.default_rng(seed)
    if group > 1:
        if n % group:
            raise EiclError(f"classes.preserve_ordering_every_n = {group} must divide the "
                            f"{n} classes the dataset holds")
        blocks = rng.choice(n // group, size=n // group, replace=False)
        return (blocks[:, None] * group + np.arange(group)[None, :]).reshape(n).astype(np.int32)
    return rng.choice(n, size=n, replace=False).astype(np.int32)


def make_split(n_classes: int, c: ClassesConfig) -> ClassSplit:
    """Split `n_classes` sorted dataset classes as the config asks."""
    needed = c.n_rare + c.n_common + c.n_holdout
    if needed > n_classes:
        raise EiclError(
            f"classes.n_rare + n_common + n_holdout = {needed} exceeds the {n_classes} classes "
            f"the loaded dataset holds")
    order = permute_classes(n_classes, c.split_seed, c.preserve_ordering_every_n)
    rare = order[:c.n_rare]
    common = order[c.n_rare:c.n_rare + c.n_common]
    # From the end, so the holdout set does not move when n_rare / n_common change.
    holdout = order[n_classes - c.n_holdout:]
    non_holdout = np.concatenate([rare, common])
    w = pool_weights(c.n_rare, c.n_common, c.zipf_exponent, c.use_zipf_for_common_rare)
    return ClassSplit(order=order, rare=rare, common=common, holdout=holdout,
                      non_holdout=non_holdout, zipf=w["zipfian"], rare_weights=w["rare"],
                      common_weights=w["common"], holdout_weights=uniform(c.n_holdout))
