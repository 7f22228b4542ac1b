"""The runs one training loop advances: one run, or K runs stacked in one
jitted step (`eicl sweep --stack K`).

Stacked, the step is the ordinary update under jax.vmap over a leading run
axis of the parameters, optimizer and batch-norm state, label masks, keys
and batch; the image set is shared. Each run keeps its own seed (initial
parameters, step keys, data stream) and its own generator, so stacked runs
may differ in anything that only changes which sequences are drawn
(experiment_keys.STACKABLE_KEYS). A small model leaves an accelerator mostly
idle; K stacked runs cost far less than K runs one after another.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..data.batch_workers import BatchWorkers, worker_count
from ..data.sequences import SequenceGenerator, train_fields
from ..errors import EiclError
from ..evaluate import device_label_masks
from ..experiment_keys import STACKABLE_KEYS, stack_difference
from ..parallel import Placement
from .flat_step import Carry, steps_per_call
from .step import initial_state, make_train_step, regraft, zero_sums


def check_stackable(cfgs: list[Config], names: list[str] | None = None) -> None:
    """Refuse runs that cannot share one step, naming the first differing key."""
    if not cfgs:
        raise EiclError("nothing to stack")
    names = names or [f"run {i}" for i in range(len(cfgs))]
    for cfg, name in zip(cfgs[1:], names[1:]):
        differs = stack_difference(cfgs[0], cfg)
        if differs:
            key, a, b = differs
            raise EiclError(
                f"cannot stack {names[0]} and {name}: {key} differs ({a!r} vs {b!r}); "
                f"stacked runs may differ only in "
                f"{', '.join(sorted(k for k in STACKABLE_KEYS if not k.startswith('data.')))}")


def stack_trees(trees: list[Any]) -> Any:
    """K pytrees of one structure -> one, every array leaf with a leading K axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0],
                                  *trees)


def replica(tree: Any, i: int) -> Any:
    """Replica i of a stacked pytree (the leading axis indexed away)."""
    return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, tree)


class Trainer:
    """K runs of one config's shapes and the step that advances them: K = 1
    the ordinary step (placed on this process's devices), K > 1 the stacked
    one (one device, each run's batches drawn by worker processes where
    train.draw_workers says so)."""

    def __init__(self, cfgs: list[Config], dataset: Any, data: Any,
                 place: Placement | None = None) -> None:
        check_stackable(cfgs)
        self.cfgs = list(cfgs)
        self.stacked = len(cfgs) > 1
        self.place = place or Placement(None)
        self.per_call = steps_per_call(cfgs[0].train.steps_per_call)
        self.step_fn = make_train_step(cfgs[0], stacked=self.stacked)
        self.generators = [SequenceGenerator(dataset, cfg) for cfg in cfgs]
        image_shape = tuple(dataset.images.shape[1:])
        firsts, keys, masks = [], [], []
        for cfg, gen in zip(cfgs, self.generators):
            model, state, opt_state, step_key = initial_state(cfg, image_shape)
            if firsts:  # one structure for all (batch norm's state markers differ per build)
                model, state, opt_state = (regraft(m, t) for m, t in
                                           zip(firsts[0], (model, state, opt_state)))
            firsts.append((model, state, opt_state))
            keys.append(step_key)
            masks.append(device_label_masks(gen, cfg.sequences.train_kind))
        self.workers: BatchWorkers | None = None
        if self.stacked:
            self.consts = (data, stack_trees(masks), jnp.stack(keys))
            n_workers = worker_count(cfgs[0].train.draw_workers, len(cfgs),
                                     jax.default_backend())
            if n_workers:
                self.workers = BatchWorkers(dataset, cfgs, n_workers)
        else:
            self.consts = self.place.replicate((data, masks[0], keys[0]))
        self.data = self.consts[0]
        self.set_runs(firsts)
        self.reset_sums()

    @property
    def draw_workers(self) -> int:
        """Processes drawing the stacked runs' batches (0: drawn in-process)."""
        return self.workers.workers if self.workers is not None else 0

    def set_runs(self, trees: list[tuple[Any, Any, Any]]) -> None:
        """Replace every run's (model, state, opt_state), e.g. by a checkpoint's."""
        if self.stacked:
            model, state, opt_state = (stack_trees(list(t)) for t in zip(*trees))
        else:
            model, state, opt_state = self.place.replicate(trees[0])
        self.carry = Carry.pack(model, state, opt_state)

    def run(self, i: int) -> tuple[Any, Any, Any]:
        """Run i's (model, batch-norm state, optimizer state)."""
        trees = self.carry.unpack()
        return tuple(replica(t, i) for t in trees) if self.stacked else trees

    def reset_sums(self) -> None:
        """Zero the training-metric accumulators (after a log line)."""
        if self.stacked:
            self.sums = stack_trees([zero_sums() for _ in self.cfgs])
        else:
            self.sums = self.place.replicate(zero_sums())

    def host_sums(self) -> list[dict[str, Any]]:
        """Each run's summed training metrics since the last reset, on the host."""
        host = jax.device_get(self.sums)
        if not self.stacked:
            return [host]
        return [{k: v[i] for k, v in host.items()} for i in range(len(self.cfgs))]

    def batch(self, step: int, n: int = 1) -> dict[str, jax.Array]:
        """The batches of steps step .. step + n - 1 on the device (one call's):
        (B, L) arrays, with n > 1 (n, B, L); stacked, a run axis after n's."""
        if not self.stacked:
            return self.place.batch(train_fields(self.generators[0], step, n),
                                    steps_first=n > 1)
        if self.workers is not None:
            fields = self.workers.fields(step, n)
        else:
            fields = [train_fields(g, step, n) for g in self.generators]
        runs_axis = 0 if n == 1 else 1
        return {k: jnp.asarray(np.stack([f[k] for f in fields], axis=runs_axis))
                for k in fields[0]}

    def advance(self, batch: dict[str, jax.Array], step: int, n: int = 1) -> None:
        """Steps step .. step + n - 1 (`batch` from batch(step, n)); returns
        once dispatched, before the device is done."""
        self.carry, self.sums = self.step_fn.call(self.consts, self.carry, batch, step, n,
                                                  self.sums)

    def first_call(self, k: int) -> tuple[Any, tuple]:
        """The jitted function of a call of k steps from step 0 and its
        arguments, as `advance` would pass them: for compiling it elsewhere
        (the GPU modelling tools compile it for a GPU without one)."""
        args = (self.consts, self.carry.leaves, self.batch(0, k),
                jnp.asarray(0, jnp.int32), self.sums)
        return self.step_fn.jitted(self.carry.treedef, k), args

    def close(self) -> None:
        """Stop the batch workers, if any."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None
