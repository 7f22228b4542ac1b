"""The jitted training step called on a flat list of arrays.

Passing the model, batch-norm state and optimizer state as pytrees makes
every call flatten them again on the host: 400+ arrays inside Equinox
modules for the paper model, 4.7 ms per call through `eqx.filter_jit` on a
2-core CPU, while the whole step of that model on an H100 takes about 15 ms.
A device that finishes its step before the host has dispatched the next one
idles. So the training loops hold the carry as a `Carry` (the leaves plus
their tree structure), the step takes and returns the leaves alone, and the
trees are rebuilt only to log, evaluate and save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax

# update(consts, model, state, opt_state, batch, step, sums)
#   -> (model, state, opt_state, sums)
Update = Callable[..., tuple[Any, Any, Any, Any]]


@dataclass(frozen=True)
class Carry:
    """The model, state and optimizer state as leaves plus their structure."""

    leaves: list[jax.Array]
    treedef: Any

    @staticmethod
    def pack(model: Any, state: Any, opt_state: Any) -> "Carry":
        leaves, treedef = jax.tree_util.tree_flatten((model, state, opt_state))
        bad = [type(x).__name__ for x in leaves if not eqx.is_array(x)]
        if bad:  # a non-array leaf would be traced as a constant or refused by jit
            raise TypeError(f"the training carry must hold only arrays; found {sorted(set(bad))}")
        return Carry(leaves, treedef)

    def unpack(self) -> tuple[Any, Any, Any]:
        """(model, state, opt_state)."""
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


class FlatStep:
    """`update` jitted over a Carry's leaves, with the carry and the metric
    sums donated (the caller must use only what a call returns):
    step(consts, carry, batch, step, sums) -> (carry, sums)."""

    def __init__(self, update: Update):
        self._update = update
        self._compiled: dict[Any, Callable] = {}

    def _for(self, treedef: Any) -> Callable:
        fn = self._compiled.get(treedef)
        if fn is None:
            update = self._update

            def train_step(consts, leaves, batch, step, sums):
                model, state, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
                model, state, opt_state, sums = update(consts, model, state, opt_state,
                                                       batch, step, sums)
                out, out_def = jax.tree_util.tree_flatten((model, state, opt_state))
                if out_def != treedef:  # checked once, while tracing
                    raise ValueError("the update changed the carry's structure")
                return out, sums

            fn = self._compiled[treedef] = jax.jit(train_step, donate_argnums=(1, 4))
        return fn

    def __call__(self, consts: Any, carry: Carry, batch: Any, step: jax.Array,
                 sums: Any) -> tuple[Carry, Any]:
        leaves, sums = self._for(carry.treedef)(consts, carry.leaves, batch, step, sums)
        return Carry(leaves, carry.treedef), sums
