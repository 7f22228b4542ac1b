"""Which config keys change an experiment, and which only say where it runs,
how it is compiled or which seed it draws: the rules that decide when two
runs are one experiment (report), may share one stacked step (sweep --stack)
or one compiled step (the training step cache).

Pure rules on config values, without JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import config as config_mod
from .config import Config

# Where a run writes, which cache file it read, which trackers show it and
# which extra steps it keeps for dynamics: never what it computes.
BOOKKEEPING_KEYS = frozenset({
    "run.name", "run.out_dir", "data.data_dir", "data.cache_file", "data.cache_sha256",
    "run.trackers", "run.wandb_project", "run.wandb_entity",
    "run.checkpoint_schedule", "run.checkpoints_per_decade",
})

# How the step is compiled and called, not what it computes.
EXECUTION_KEYS = frozenset({
    "transformer.unroll", "embedding.conv_impl", "embedding.stem_impl",
    "train.steps_per_call", "train.draw_workers",
})

# Runs that differ only in these keys are one experiment at other seeds (or
# a repeat of it): a report pools them into one row.
SAME_EXPERIMENT_KEYS = BOOKKEEPING_KEYS | EXECUTION_KEYS | {"run.seed"}

# Keys that may differ between stacked runs: they change the data stream,
# the seeds or the bookkeeping, never an array shape or the compiled step.
# data.data_dir is not among them: a stack loads one data cache for all.
STACKABLE_KEYS = frozenset({
    "run.seed", "run.name", "run.out_dir",
    "run.trackers", "run.wandb_project", "run.wandb_entity",
    "data.cache_file", "data.cache_sha256",
    "classes.split_seed", "classes.zipf_exponent", "classes.use_zipf_for_common_rare",
    "sequences.p_bursty", "sequences.p_bursty_common", "sequences.p_bursty_zipfian",
    "sequences.p_fewshot", "sequences.non_bursty_type", "sequences.grouped",
    "sequences.all_unique", "eval.seed",
})


# Sections a run may change as it continues from a checkpoint (train
# --resume --set): how long it trains and how often it logs, evaluates and
# checkpoints, and what its evaluations draw. Not run.seed, which the data
# stream from the checkpoint on depends on.
CONTINUABLE_SECTIONS = frozenset({"run", "eval"})


def flat(cfg: Config, used_only: bool = False) -> dict[str, Any]:
    """section.key -> value. With `used_only`, the sections the run's model
    does not use (`rnn` for a transformer, `transformer` for a recurrent
    model) are left out, so that their inherited values do not read as
    differences."""
    unused = ({"rnn"} if cfg.model.kind == "transformer" else {"transformer"}) if used_only \
        else set()
    return {f"{s}.{k}": v for s, section in config_mod.to_dict(cfg).items() if s not in unused
            for k, v in section.items()}


def _identity(values: dict[str, Any], leave_out: frozenset[str]) -> str:
    return repr(sorted((k, repr(v)) for k, v in values.items() if k not in leave_out))


def experiment_identity(cfg: Config) -> str:
    """Equal for runs that compute the same experiment, whatever their seed."""
    return _identity(flat(cfg, used_only=True), SAME_EXPERIMENT_KEYS)


def stack_identity(cfg: Config) -> str:
    """Equal for runs that can share one stacked step."""
    return _identity(flat(cfg), STACKABLE_KEYS)


def stack_difference(a: Config, b: Config) -> tuple[str, Any, Any] | None:
    """The first key that keeps two runs out of one stack: (key, a's, b's)."""
    fa, fb = flat(a), flat(b)
    return next(((k, v, fb[k]) for k, v in fa.items()
                 if k not in STACKABLE_KEYS and fb[k] != v), None)


def step_identity(cfg: Config) -> str:
    """What the compiled training step depends on: everything but the run's
    bookkeeping and evaluation (and run.steps only for the cosine schedule),
    so runs that differ in steps, seed or logging share one compilation."""
    keep_steps = cfg.run.steps if cfg.optimizer.schedule == "cosine" else 0
    neutral = cfg.replace(run=config_mod.RunConfig(steps=keep_steps),
                          eval=config_mod.EvalConfig(),
                          data=dataclasses.replace(cfg.data, cache_file="", cache_sha256=""))
    return config_mod.to_toml(neutral)


def may_change_on_resume(key: str) -> bool:
    """Whether a run continued from a checkpoint may take another value of
    `key` (section.key) and still be the run the checkpoint belongs to."""
    return (key in BOOKKEEPING_KEYS or key in EXECUTION_KEYS
            or (key.split(".")[0] in CONTINUABLE_SECTIONS and key != "run.seed"))


def continuation_difference(recorded: Config, current: Config) -> list[str]:
    """The keys, in config order, in which `current` differs from the config
    a checkpoint `recorded` and that a run continued from it may not change:
    empty when the checkpoint belongs to this run. Sections the model does
    not use are left out, as in a report."""
    a, b = flat(recorded, used_only=True), flat(current, used_only=True)
    return [k for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k) and not may_change_on_resume(k)]
