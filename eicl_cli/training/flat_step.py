"""The jitted training step called on a flat list of arrays.

Passing the model, batch-norm state and optimizer state as pytrees makes
every call flatten them again on the host: 400+ arrays inside Equinox
modules for the paper model, a host cost of the same order as the whole
step of that model on a GPU (docs/performance.md). A device that finishes
its step before the host has dispatched the next one idles. So the training loops hold the carry as a `Carry` (the leaves plus
their tree structure), the step takes and returns the leaves alone, and the
trees are rebuilt only to log, evaluate and save.

Even so, every call costs the host a fixed price: handing 400+ buffers to
the runtime, donating them and taking the new ones back, plus the dispatch
itself. `FlatStep.steps` runs several steps in one call (a loop on the
device over batches sent together), and `call_plan` splits a run into
such calls without letting one cross a log, evaluation or checkpoint step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

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
        self._compiled_steps: dict[Any, Callable] = {}

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

    def _steps_for(self, treedef: Any) -> Callable:
        fn = self._compiled_steps.get(treedef)
        if fn is None:
            update = self._update

            def train_steps(consts, leaves, batches, first, sums):
                def one(carried, xs):
                    leaves, sums = carried
                    batch, step = xs
                    model, state, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
                    model, state, opt_state, sums = update(consts, model, state, opt_state,
                                                           batch, step, sums)
                    return (jax.tree_util.tree_leaves((model, state, opt_state)), sums), None

                n = jax.tree_util.tree_leaves(batches)[0].shape[0]
                steps = first + jnp.arange(n, dtype=jnp.int32)
                (leaves, sums), _ = jax.lax.scan(one, (leaves, sums), (batches, steps))
                return leaves, sums

            fn = self._compiled_steps[treedef] = jax.jit(train_steps, donate_argnums=(1, 4))
        return fn

    def jitted(self, treedef: Any, n: int) -> Callable:
        """The jitted function a call of n steps runs, taking
        (consts, leaves, batch, first step, sums): to lower or inspect it."""
        return self._for(treedef) if n == 1 else self._steps_for(treedef)

    def call(self, consts: Any, carry: Carry, batch: Any, step: int, n: int,
             sums: Any) -> tuple[Carry, Any]:
        """Steps step .. step + n - 1: the one step (n = 1, `batch` one step's)
        or `steps` (n > 1, `batch` n steps' stacked), as `call_plan` sizes them."""
        first = jnp.asarray(step, jnp.int32)
        if n == 1:
            return self(consts, carry, batch, first, sums)
        return self.steps(consts, carry, batch, first, sums)

    def steps(self, consts: Any, carry: Carry, batches: Any, first: jax.Array,
              sums: Any) -> tuple[Carry, Any]:
        """Steps first, first + 1, ..., first + n - 1 in one call, where every
        array of `batches` holds the n batches stacked on a new leading axis.
        The same updates as n calls of the step (XLA may fuse the loop's body
        differently, so the rounding may differ); one compilation per n."""
        leaves, sums = self._steps_for(carry.treedef)(consts, carry.leaves, batches, first, sums)
        return Carry(leaves, carry.treedef), sums


# Steps per call where train.steps_per_call = 0 (auto): on a GPU ten steps a
# call amortise the call's fixed price; on a CPU a step dwarfs that price,
# and XLA's CPU convolutions ran slower inside the loop. The measurements are
# in docs/performance.md ("Several steps per device call").
AUTO_STEPS_PER_CALL = {"cpu": 1}
AUTO_STEPS_PER_CALL_ACCELERATOR = 10


def steps_per_call(requested: int, backend: str | None = None) -> int:
    """train.steps_per_call as run: the value itself, or for 0 the choice for
    this machine's JAX backend (1 on a CPU, 10 on a GPU or other accelerator)."""
    if requested:
        return requested
    backend = backend or jax.default_backend()
    return AUTO_STEPS_PER_CALL.get(backend, AUTO_STEPS_PER_CALL_ACCELERATOR)


def call_plan(start: int, total: int, per_call: int, intervals: tuple[int, ...],
              points: Sequence[int] = ()) -> Iterator[int]:
    """How many steps each device call runs, from step `start` to `total`:
    `per_call` where that many fit before the next multiple of any of
    `intervals` (log, evaluation, checkpoint) and the next of the sorted
    `points` (steps kept for dynamics), else single steps up to it. Calls
    of one size and of one step compile once each; a remainder size would
    compile again."""
    step = start
    ahead = [p for p in points if p > start]
    while step < total:
        while ahead and ahead[0] <= step:
            ahead.pop(0)
        bound = min([total] + [(step // i + 1) * i for i in intervals if i > 0] + ahead[:1])
        n = per_call if per_call > 1 and step + per_call <= bound else 1
        yield n
        step += n
