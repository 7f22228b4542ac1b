"""Stacked runs: K runs whose arrays have the same shapes, trained in ONE
jitted step (`eicl sweep --stack K`).

The step is the ordinary update (train.make_update) under jax.vmap over a
leading replica axis of the parameters, optimizer and batch-norm state,
label masks, keys and batch; the image set is shared. Each run keeps its own
seed (initial parameters, step keys, data stream) and its own generator, so
runs may differ in anything that only changes which sequences are drawn:
p_bursty, the Zipf exponent, seeds... A small model leaves an accelerator
mostly idle; K stacked runs cost about the time of one.

Each run writes its own run folder exactly as `eicl train` does (config.toml,
metrics.jsonl, checkpoints of that run alone), so it can be resumed, reported
and evaluated like any other, alone or again as part of a stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, display, environment, runs
from . import config as config_mod
from .config import Config
from .data.batch_workers import BatchWorkers, worker_count
from .data.sequences import train_fields
from .errors import EiclError
from .evaluate import device_label_masks, evaluate_modes, table_rows
from .flat_step import Carry, FlatStep, call_plan, steps_per_call
from .optim import evaluation_model

# Keys that may differ between stacked runs: they change the data stream,
# the seeds or the bookkeeping, never an array shape or the compiled step.
STACKABLE_KEYS = frozenset({
    "run.seed", "run.name", "run.out_dir",
    "data.cache_file", "data.cache_sha256",
    "classes.split_seed", "classes.zipf_exponent", "classes.use_zipf_for_common_rare",
    "sequences.p_bursty", "sequences.p_bursty_common", "sequences.p_bursty_zipfian",
    "sequences.p_fewshot", "sequences.non_bursty_type", "sequences.grouped",
    "sequences.all_unique", "eval.seed",
})


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in config_mod.to_dict(cfg).items()
            for k, v in section.items()}


def check_stackable(cfgs: list[Config], names: list[str] | None = None) -> None:
    """Refuse runs that cannot share one step, naming the first differing key."""
    if not cfgs:
        raise EiclError("nothing to stack")
    names = names or [f"run {i}" for i in range(len(cfgs))]
    first = _flat(cfgs[0])
    for cfg, name in zip(cfgs[1:], names[1:]):
        other = _flat(cfg)
        for key, value in first.items():
            if key not in STACKABLE_KEYS and other[key] != value:
                raise EiclError(
                    f"cannot stack {names[0]} and {name}: {key} differs ({value!r} vs "
                    f"{other[key]!r}); stacked runs may differ only in "
                    f"{', '.join(sorted(k for k in STACKABLE_KEYS if not k.startswith('data.')))}")


def stack_key(cfg: Config) -> str:
    """Runs with equal keys can share a stack (what sweep grouping compares)."""
    flat = _flat(cfg)
    return repr(sorted((k, repr(v)) for k, v in flat.items() if k not in STACKABLE_KEYS))


# ---------------------------------------------------------------- pytrees

def stack_trees(trees: list[Any]) -> Any:
    """K pytrees of one structure -> one, every array leaf with a leading K axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0],
                                  *trees)


def replica(tree: Any, i: int) -> Any:
    """Replica i of a stacked pytree (the leading axis indexed away)."""
    return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def _regraft(like: Any, tree: Any) -> Any:
    """`tree`'s leaves in `like`'s pytree structure."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- the step

_STACKED_STEPS: dict[str, Any] = {}


def make_stacked_step(cfg: Config) -> FlatStep:
    """The jitted update of K runs of `cfg`'s shapes at once:
    step(consts, carry, batches, step, sums) -> (carry, sums), consts =
    (shared device data, stacked masks, stacked keys), the carry holding the
    stacked models, states and optimizer states. Carry and sums are donated."""
    from .train import _step_identity, make_update
    identity = _step_identity(cfg)
    if identity not in _STACKED_STEPS:
        update = make_update(cfg)
        in_axes = ((None, 0, 0), 0, 0, 0, 0, None, 0)
        _STACKED_STEPS[identity] = FlatStep(eqx.filter_vmap(update, in_axes=in_axes))
    return _STACKED_STEPS[identity]


@dataclass
class StackedState:
    """Everything the stacked step carries, plus the per-run generators."""

    cfgs: list[Config]
    generators: list[Any]
    consts: Any
    carry: Carry  # the stacked models, states and optimizer states
    sums: Any
    workers: BatchWorkers | None = None  # drawing the runs' batches, if any

    @property
    def draw_workers(self) -> int:
        return self.workers.workers if self.workers is not None else 0

    def trees(self) -> tuple[Any, Any, Any]:
        """(stacked model, stacked state, stacked optimizer state)."""
        return self.carry.unpack()

    @staticmethod
    def fresh(cfgs: list[Config], dataset: Any, data: Any) -> "StackedState":
        from .data.sequences import SequenceGenerator
        from .train import initial_state, zero_sums
        check_stackable(cfgs)
        image_shape = tuple(dataset.images.shape[1:])
        gens, models, states, opts, keys, masks = [], [], [], [], [], []
        for cfg in cfgs:
            gen = SequenceGenerator(dataset, cfg)
            model, state, opt_state, step_key = initial_state(cfg, image_shape)
            if models:  # one structure for all (batch norm's state markers differ per build)
                model, state, opt_state = (_regraft(models[0], model), _regraft(states[0], state),
                                           _regraft(opts[0], opt_state))
            gens.append(gen)
            models.append(model)
            states.append(state)
            opts.append(opt_state)
            keys.append(step_key)
            masks.append(device_label_masks(gen, cfg.sequences.train_kind))
        k = len(cfgs)
        n_workers = worker_count(cfgs[0].train.draw_workers, k, jax.default_backend())
        return StackedState(
            cfgs=list(cfgs), generators=gens,
            consts=(data, stack_trees(masks), jnp.stack(keys)),
            carry=Carry.pack(stack_trees(models), stack_trees(states), stack_trees(opts)),
            sums=stack_trees([zero_sums() for _ in range(k)]),
            workers=BatchWorkers(dataset, cfgs, n_workers) if n_workers else None)

    def batch(self, step: int, n: int = 1) -> dict[str, jax.Array]:
        """The runs' batches of step `step`, (K, B, L); with n > 1 those of
        steps step .. step + n - 1, (n, K, B, L), for FlatStep.steps."""
        if self.workers is not None:
            fields = self.workers.fields(step, n)
        else:
            fields = [train_fields(g, step, n) for g in self.generators]
        runs_axis = 0 if n == 1 else 1
        return {k: jnp.asarray(np.stack([f[k] for f in fields], axis=runs_axis))
                for k in fields[0]}

    def close(self) -> None:
        """Stop the batch workers, if any."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def step(self, step_fn: FlatStep, batch: dict[str, jax.Array], step: int, n: int = 1) -> None:
        """Step `step` (n steps from it with n > 1, `batch` from batch(step, n))."""
        self.carry, self.sums = step_fn.call(self.consts, self.carry, batch, step, n, self.sums)


# ---------------------------------------------------------------- training

def train_stack(cfgs: list[Config], run_dirs: list[Path], *, live: bool | None = None,
                dataset: Any = None) -> list[int]:
    """Train (or continue) K run folders in one stacked step up to run.steps.
    Each folder must already hold its config.toml; folders with checkpoints
    resume from their newest intact one, and all must then be at one step.
    Returns the step every run reached. Holds every run's lock throughout."""
    with contextlib.ExitStack() as held:
        for run_dir in run_dirs:
            held.enter_context(runs.train_lock(run_dir))
        return _train_stack(cfgs, run_dirs, live=live, dataset=dataset)


def _train_stack(cfgs: list[Config], run_dirs: list[Path], *, live: bool | None,
                 dataset: Any) -> list[int]:
    from .data.dataset import load_dataset
    from .inputs import device_data
    from .train import with_cache_identity

    run_dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in run_dirs]
    check_stackable(cfgs, names)
    if dataset is None:
        dataset = load_dataset(cfgs[0])
    cfgs = [with_cache_identity(c, dataset.cache_file, dataset.cache_sha256) for c in cfgs]
    tomls = [config_mod.to_toml(c) for c in cfgs]
    data = device_data(dataset, cfgs[0])
    stacked = StackedState.fresh(cfgs, dataset, data)
    try:
        return _run_stack(cfgs, run_dirs, names, tomls, data, stacked, live=live)
    finally:
        stacked.close()


def _run_stack(cfgs: list[Config], run_dirs: list[Path], names: list[str], tomls: list[str],
               data: Any, stacked: StackedState, *, live: bool | None) -> list[int]:
    """The stacked training loop proper: restore, then step, log, evaluate
    and checkpoint every run until run.steps."""
    from .optim import learning_rate_schedule
    from .train import (TrainingDiverged, _Interrupt, _all_finite, _restore,
                        checkpoint_and_evaluate, train_record, zero_sums)

    starts, elapsed = [], []
    models, states, opts = [], [], []
    fresh = stacked.trees()
    for i, run_dir in enumerate(run_dirs):
        mine = [replica(tree, i) for tree in fresh]
        restored = _restore(run_dir, *mine)
        if restored is None:
            starts.append(0)
            elapsed.append(0.0)
            models.append(mine[0])
            states.append(mine[1])
            opts.append(mine[2])
        else:
            starts.append(restored.step)
            elapsed.append(float(restored.metadata.get("elapsed", 0.0)))
            models.append(restored.model)
            states.append(restored.state)
            opts.append(restored.opt_state)
    if len(set(starts)) > 1:
        detail = ", ".join(f"{n} at {s}" for n, s in zip(names, starts))
        raise EiclError(f"stacked runs must resume from one step ({detail}); "
                        "continue them separately or in groups of equal steps")
    start = starts[0]
    if start > 0:
        stacked.carry = Carry.pack(stack_trees(models), stack_trees(states), stack_trees(opts))
    total = cfgs[0].run.steps
    if start >= total:  # nothing to train: the runs' files stay as they are
        return [start] * len(cfgs)
    for run_dir, cfg, text in zip(run_dirs, cfgs, tomls):
        runs.truncate_metrics(run_dir, start)
        if (run_dir / runs.CONFIG_FILE).read_text() != text:
            runs.write_config(run_dir, cfg)
    per_call = steps_per_call(cfgs[0].train.steps_per_call)
    env = {**environment.record(start), "stacked_with": len(run_dirs), "steps_per_call": per_call,
           "draw_workers": stacked.draw_workers}
    for run_dir in run_dirs:
        runs.append_environment(run_dir, env)

    r = cfgs[0].run
    step_fn = make_stacked_step(cfgs[0])
    schedule = learning_rate_schedule(cfgs[0].optimizer, total)
    t0 = time.perf_counter()

    def now(i: int) -> float:
        return elapsed[i] + time.perf_counter() - t0

    def save(step: int, final: bool = False) -> None:
        models, states, opt_states = stacked.trees()
        for i, run_dir in enumerate(run_dirs):
            model = replica(models, i)
            if not _all_finite(model):
                raise TrainingDiverged(f"{names[i]}: parameters became non-finite before step "
                                       f"{step}; kept the last good checkpoint")
            checkpoint.save(runs.checkpoint_path(run_dir, step), step=step, model=model,
                            state=replica(states, i),
                            opt_state=replica(opt_states, i), config_toml=tomls[i],
                            final=final, extra={"elapsed": f"{now(i):.3f}"})
            checkpoint.prune(runs.list_checkpoints(run_dir), r.keep_checkpoints)

    def evaluate(step: int, view: display.TrainDisplay) -> None:
        models, states, opt_states = stacked.trees()
        models = evaluation_model(models, opt_states)
        for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            started = time.perf_counter()
            results = evaluate_modes(replica(models, i), replica(states, i), data,
                                     stacked.generators[i], list(cfg.eval.modes),
                                     cfg.eval.train_sequences, cfg.eval.batch_size,
                                     cfg.eval.seed)
            took = time.perf_counter() - started
            for mode, m in results.items():
                runs.append_metrics(run_dir, {"kind": "eval", "step": step, "mode": mode,
                                              "time": round(now(i), 3), **m,
                                              "sequences_per_s": m["sequences"] / max(took, 1e-9)})
            view.print(f"{names[i]}:")
            view.eval_table(step, table_rows(cfg, results), elapsed=now(i))

    sizes = call_plan(start, total, per_call,
                      (r.log_every, r.eval_every, r.checkpoint_every))
    step, n = start, next(sizes)
    batch = stacked.batch(step, n)
    last_log_step, last_log_time = start, time.perf_counter()
    with _Interrupt() as interrupt, display.TrainDisplay(total, start, live=live) as view:
        while n:
            stacked.step(step_fn, batch, step, n)
            done = step + n
            step, n = done, next(sizes, 0)
            if n:  # drawn on the host while the device computes
                batch = stacked.batch(step, n)

            if done % r.log_every == 0 or done == total or interrupt.requested:
                host = jax.device_get(stacked.sums)
                t = time.perf_counter()
                sps = (done - last_log_step) / max(t - last_log_time, 1e-9)
                for i, run_dir in enumerate(run_dirs):
                    bad = int(host["first_bad"][i])
                    if bad >= 0 or not math.isfinite(float(host["loss"][i])):
                        raise TrainingDiverged(
                            f"{names[i]}: training loss became non-finite (step {bad + 1}); "
                            "stopped the stack, keeping each run's last good checkpoint")
                    one = {k: v[i] for k, v in host.items()}
                    runs.append_metrics(run_dir, train_record(cfgs[i], one, done, now(i), sps,
                                                              float(schedule(done - 1))))
                view.log(done, float(np.mean(host["loss"] / np.maximum(host["count"], 1))),
                         float(np.mean(host["accuracy_query"] / np.maximum(host["count"], 1))),
                         sps, float(schedule(done - 1)))
                stacked.sums = stack_trees([zero_sums() for _ in cfgs])
                last_log_step, last_log_time = done, t

            paused = time.perf_counter()
            if interrupt.requested and done < total:
                save(done)
                return [done] * len(cfgs)
            checkpoint_and_evaluate(done, total, r, save, evaluate, view)
            last_log_time += time.perf_counter() - paused
    return [total] * len(cfgs)


def with_seed(cfg: Config, seed: int) -> Config:
    return cfg.replace(run=dataclasses.replace(cfg.run, seed=seed))
