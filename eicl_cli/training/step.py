"""The training step: one run's update as a plain function, jitted as is for
one run or vmapped over K stacked runs, and a fresh run's initial state.

Every random number is a function of (run.seed, step): the data through the
generator, dropout and pixel noise through fold_in(key, step). Nothing random
is carried from step to step, so a run resumed from a checkpoint at step N
sees exactly the batches and keys an uninterrupted run would, and ends
bit-for-bit equal.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import Config
from ..experiment_keys import step_identity
from ..inputs import materialise
from ..metrics import METRIC_NAMES, batch_metrics, loss_fn
from ..optim import make_optimizer
from .flat_step import FlatStep

_STEPS: dict[tuple[str, bool], FlatStep] = {}


def make_train_step(cfg: Config, stacked: bool = False) -> FlatStep:
    """The jitted update for this config (one per config and process):
    step(consts, carry, batch, step, sums) -> (carry, sums). Stacked, every
    array but the shared image data has a leading run axis. The carry and
    sums are donated: the caller must use only the returned ones."""
    identity = (step_identity(cfg), stacked)
    if identity not in _STEPS:
        update = make_update(cfg)
        if stacked:  # consts = (shared data, stacked masks, stacked keys)
            update = eqx.filter_vmap(update, in_axes=((None, 0, 0), 0, 0, 0, 0, None, 0))
        _STEPS[identity] = FlatStep(update)
    return _STEPS[identity]


def make_update(cfg: Config):
    """The update of one run as a plain (unjitted) function:
    update(consts, model, state, opt_state, batch, step, sums) -> (model,
    state, opt_state, sums)."""
    from ..model import forward_batch
    w_interim = cfg.train.w_interim
    optimizer = make_optimizer(cfg)

    def step_fn(consts, model, state, opt_state, batch, step, sums):
        # consts = (device data, label masks, base key): read, never donated.
        data, masks, base_key = consts
        key = jax.random.fold_in(base_key, step)
        k_inputs, k_model = jax.random.split(key)
        examples = materialise(data, batch, k_inputs)

        def loss_of(m):
            logits, new_state = forward_batch(m, state, examples, batch["label"], key=k_model,
                                              inference=False, query_only=w_interim == 0)
            return loss_fn(logits, batch["label"], w_interim), (new_state, logits)

        (loss, (new_state, logits)), grads = eqx.filter_value_and_grad(loss_of, has_aux=True)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        m = batch_metrics(jax.lax.stop_gradient(logits), batch["label"], masks)
        new_sums = {k: sums[k] + jnp.asarray(m[k], jnp.float32) for k in METRIC_NAMES}
        new_sums["loss"] = sums["loss"] + loss
        new_sums["count"] = sums["count"] + 1
        # The first step whose loss is not finite, or -1: named in the error.
        new_sums["first_bad"] = jnp.where((sums["first_bad"] < 0) & ~jnp.isfinite(loss),
                                          step, sums["first_bad"])
        return model, new_state, opt_state, new_sums

    return step_fn


def zero_sums() -> dict[str, jax.Array]:
    """The training-metric accumulators the step adds to between log lines."""
    sums = {k: jnp.zeros((), jnp.float32) for k in (*METRIC_NAMES, "loss")}
    sums["count"] = jnp.zeros((), jnp.int32)
    sums["first_bad"] = jnp.full((), -1, jnp.int32)
    return sums


_SKELETONS: dict[str, tuple[Any, Any]] = {}


def regraft(like: Any, tree: Any) -> Any:
    """`tree`'s leaves in `like`'s pytree structure."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        jax.tree_util.tree_leaves(tree))


def build_model_shared(cfg: Config, key: jax.Array, image_shape: tuple[int, ...]):
    """build_model, but the second model of the same config in one process
    reuses the first one's pytree structure (only the arrays differ). Batch
    norm's state markers are fresh objects on every build, so without this
    every run in a process (tests, notebooks) would compile the step again."""
    from ..model import build_model
    model, state = build_model(cfg, key, image_shape)
    identity = step_identity(cfg) + repr(tuple(image_shape))
    if identity not in _SKELETONS:
        _SKELETONS[identity] = (model, state)
        return model, state
    model0, state0 = _SKELETONS[identity]
    return regraft(model0, model), regraft(state0, state)


def initial_state(cfg: Config, image_shape: tuple[int, ...]):
    """A fresh run's model, batch-norm state and optimizer state, and the key
    of its training steps' randomness: all from run.seed, one split, so that
    a run starts alike whether trained alone, stacked or benchmarked."""
    init_key, step_key = jax.random.split(jax.random.key(cfg.run.seed))
    model, state = build_model_shared(cfg, init_key, image_shape)
    opt_state = make_optimizer(cfg).init(eqx.filter(model, eqx.is_inexact_array))
    return model, state, opt_state, step_key


@eqx.filter_jit
def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(
        eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """Whether every float array of `tree` is finite."""
    return bool(_finite(tree))
