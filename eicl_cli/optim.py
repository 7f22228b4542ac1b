"""The optimizer and its learning-rate schedule (docs/experiment.md §7).

The paper's schedule ("rsqrt") follows the original experiment exactly:

    lr(t) = min(max_lr * t / warmup, max_lr * sqrt(warmup / t))

where t is the 0-based index of the update being applied (jaxline passes the
global step before incrementing it, and optax's count starts at 0), so the
very first update uses lr = 0 and the peak max_lr is reached at t = warmup.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .config import Config, OptimizerConfig


def learning_rate_schedule(o: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """lr as a function of the 0-based update index (a jnp scalar)."""
    max_lr = o.max_lr
    warmup = o.warmup_steps

    def warm(t):
        # warmup 0 means no warm-up at all: full max_lr from the first update.
        return max_lr * t / warmup if warmup > 0 else jnp.full_like(t, max_lr)

    if o.schedule == "rsqrt":
        def schedule(count):
            t = jnp.asarray(count, jnp.float32)
            if warmup == 0:
                # No warm-up: decay as max_lr / sqrt(t + 1) so step 0 is finite.
                return max_lr / jnp.sqrt(t + 1.0)
            # t = 0 gives 0 * inf = nan in the decay branch; guard it so the
            # min picks the warm-up branch (0) as the original does.
            decay = max_lr * jnp.sqrt(warmup / jnp.maximum(t, 1.0))
            return jnp.minimum(warm(t), decay)
    elif o.schedule == "constant":
        def schedule(count):
            t = jnp.asarray(count, jnp.float32)
            return jnp.minimum(warm(t), max_lr) if warmup > 0 else jnp.full_like(t, max_lr)
    elif o.schedule == "cosine":
        def schedule(count):
            t = jnp.asarray(count, jnp.float32)
            span = max(total_steps - warmup, 1)
            progress = jnp.clip((t - warmup) / span, 0.0, 1.0)
            cos = 0.5 * max_lr * (1.0 + jnp.cos(jnp.pi * progress))
            if warmup == 0:
                return cos
            return jnp.where(t < warmup, warm(t), cos)
    else:  # validated in config.py; a new name there must be handled here
        raise ValueError(f"unknown schedule {o.schedule!r}")
    return schedule


def _base_optimizer(o: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    wd = o.weight_decay
    coupled = {"adam": optax.adam, "sgd": optax.sgd, "rmsprop": optax.rmsprop}
    if o.name in coupled:
        # These have no decoupled decay: weight_decay is classic L2, the decay
        # added to the gradient before the update rule.
        opt = coupled[o.name](lr)
        return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt
    if o.name == "adamw":
        return optax.adamw(lr, weight_decay=wd)
    if o.name == "lamb":
        return optax.lamb(lr, weight_decay=wd)
    if o.name == "lion":
        return optax.lion(lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {o.name!r}")  # validated in config.py


class ParamsEMA(NamedTuple):
    """The moving average of the parameters, kept in the optimizer state."""

    ema: Any


def track_params_ema(decay: float) -> optax.GradientTransformation:
    """Leaves the updates as they are and keeps ema <- decay * ema + (1 - decay)
    * (params + updates), starting from the initial parameters. It must come
    last in a chain, where the updates are final. Living in the optimizer
    state, the average is checkpointed, resumed and stacked with it."""

    def init(params):
        # A copy: the step donates its inputs, and one buffer must not be donated twice.
        return ParamsEMA(jax.tree_util.tree_map(jnp.copy, params))

    def update(updates, state, params=None):
        new = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
        return updates, ParamsEMA(ema)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The configured optimizer, with global-norm clipping first when
    clip_level > 0 and the parameters' moving average last when ema_decay > 0."""
    o = cfg.optimizer
    opt = _base_optimizer(o, learning_rate_schedule(o, cfg.run.steps))
    if o.clip_level > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.clip_level), opt)
    if cfg.train.ema_decay > 0:
        opt = optax.chain(opt, track_params_ema(cfg.train.ema_decay))
    return opt


def evaluation_model(model: Any, opt_state: Any) -> Any:
    """The model to evaluate: its parameters replaced by their moving average
    where the optimizer keeps one (train.ema_decay > 0), else the model."""
    found = [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, ParamsEMA)) if isinstance(s, ParamsEMA)]
    if not found:
        return model
    return eqx.combine(found[0].ema, model)
