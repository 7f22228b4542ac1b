"""The training loop.

One jitted step does everything on the device: gather the batch's images
from the device-resident dataset, augment and noise them, run the model,
take the gradient and apply the optimizer. The host only draws the next
batch's small index arrays (a pure function of run.seed and the step) while
the device runs the current step, and waits for the device only at log,
eval and checkpoint intervals.

Every random number is a function of (run.seed, step): the data through the
generator, dropout and pixel noise through fold_in(key, step). Nothing random
is carried from step to step, so a run resumed from a checkpoint at step N
sees exactly the batches and keys an uninterrupted run would, and ends
bit-for-bit equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from . import checkpoint, display, environment, parallel, runs
from . import config as config_mod
from .config import Config
from .data.sequences import train_fields
from .errors import EiclError
from .evaluate import METRICS, device_label_masks, evaluate_modes, table_rows
from .flat_step import Carry, FlatStep, call_plan, steps_per_call
from .inputs import device_data, materialise
from .optim import evaluation_model, learning_rate_schedule, make_optimizer


class TrainingDiverged(EiclError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Outcome:
    run_dir: Path
    step: int
    status: str  # "finished" | "interrupted" | "already_done"


# ---------------------------------------------------------------- config

def with_cache_identity(cfg: Config, cache_file: str, cache_sha256: str) -> Config:
    """The config with data.cache_file / cache_sha256 filled in (what a run records)."""
    return cfg.replace(data=dataclasses.replace(cfg.data, cache_file=cache_file,
                                                cache_sha256=cache_sha256))


def resolved_config(cfg: Config) -> Config:
    """The config as a new run records it, without loading the images: the
    cache's path and checksum are filled in when the cache exists."""
    if cfg.data.dataset == "symbolic":
        return with_cache_identity(cfg, "", "")
    from .data.cache import cache_path, sha256_file
    path = cache_path(config_mod.data_dir(cfg), cfg.data.dataset)
    if not path.is_file():
        return cfg
    return with_cache_identity(cfg, str(path.resolve()), sha256_file(path))


def enable_compile_cache(cfg: Config) -> None:
    """Keep XLA's compiled programs in <data dir>/jax-cache, so the second run
    of a config (a sweep's other points, a resume, `eicl eval`) skips most of
    the compile time. An explicit JAX_COMPILATION_CACHE_DIR wins; setting
    EICL_NO_COMPILE_CACHE=1 turns it off.

    One folder per number of usable CPUs: XLA's CPU code is built for the
    thread pool it compiles with, and JAX's cache key does not include it, so
    a step compiled under `taskset -c 0` ran 25% slower when reused by a run
    with both cores (quickstart: 25 against 33 steps/s)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("EICL_NO_COMPILE_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir(cfg)))


def compile_cache_dir(cfg: Config) -> Path:
    """<data dir>/jax-cache/cpus<N>, N the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return config_mod.data_dir(cfg) / "jax-cache" / f"cpus{cpus}"


# ---------------------------------------------------------------- the step

_STEP_CACHE: dict[str, Any] = {}


def _step_identity(cfg: Config) -> str:
    """What the compiled step depends on: everything but the run bookkeeping
    (and run.steps only for the cosine schedule), so runs that differ in
    steps, seed or logging in one process share one compilation."""
    keep_steps = cfg.run.steps if cfg.optimizer.schedule == "cosine" else 0
    neutral = cfg.replace(run=config_mod.RunConfig(steps=keep_steps),
                          eval=config_mod.EvalConfig(),
                          data=dataclasses.replace(cfg.data, cache_file="", cache_sha256=""))
    return config_mod.to_toml(neutral)


def make_train_step(cfg: Config) -> FlatStep:
    """The jitted update for this config (one per config and process):
    step(consts, carry, batch, step, sums) -> (carry, sums). The carry and
    sums are donated: the caller must use only the returned ones."""
    identity = _step_identity(cfg)
    if identity not in _STEP_CACHE:
        _STEP_CACHE[identity] = _build_train_step(cfg)
    return _STEP_CACHE[identity]


_SKELETONS: dict[str, tuple[Any, Any]] = {}


def build_model_shared(cfg: Config, key: jax.Array, image_shape: tuple[int, ...]):
    """build_model, but the second model of the same config in one process
    reuses the first one's pytree structure (only the arrays differ). Batch
    norm's state markers are fresh objects on every build, so without this
    every run in a process (tests, notebooks) would compile the step again."""
    from .model import build_model
    model, state = build_model(cfg, key, image_shape)
    identity = _step_identity(cfg) + repr(tuple(image_shape))
    if identity not in _SKELETONS:
        _SKELETONS[identity] = (model, state)
        return model, state
    model0, state0 = _SKELETONS[identity]
    regraft = lambda like, tree: jax.tree_util.tree_unflatten(  # noqa: E731
        jax.tree_util.tree_structure(like), jax.tree_util.tree_leaves(tree))
    return regraft(model0, model), regraft(state0, state)


def initial_state(cfg: Config, image_shape: tuple[int, ...]):
    """A fresh run's model, batch-norm state and optimizer state, and the key
    of its training steps' randomness: all from run.seed, one split, so that
    `eicl train`, a stacked sweep and `eicl bench` start every run alike."""
    init_key, step_key = jax.random.split(jax.random.key(cfg.run.seed))
    model, state = build_model_shared(cfg, init_key, image_shape)
    opt_state = make_optimizer(cfg).init(eqx.filter(model, eqx.is_inexact_array))
    return model, state, opt_state, step_key


def _build_train_step(cfg: Config) -> FlatStep:
    return FlatStep(make_update(cfg))


def make_update(cfg: Config):
    """The update of one run as a plain (unjitted) function, so that the
    ordinary step jits it and the stacked step (stack.py) vmaps it over runs:
    update(consts, model, state, opt_state, batch, step, sums) -> (model,
    state, opt_state, sums)."""
    from .metrics import batch_metrics, loss_fn
    from .model import forward_batch
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
        new_sums = {k: sums[k] + jnp.asarray(m[k], jnp.float32) for k in METRICS}
        new_sums["loss"] = sums["loss"] + loss
        new_sums["count"] = sums["count"] + 1
        # The first step whose loss is not finite, or -1: named in the error.
        new_sums["first_bad"] = jnp.where((sums["first_bad"] < 0) & ~jnp.isfinite(loss),
                                          step, sums["first_bad"])
        return model, new_state, opt_state, new_sums

    return step_fn


def zero_sums() -> dict[str, jax.Array]:
    """The training-metric accumulators the step adds to between log lines."""
    sums = {k: jnp.zeros((), jnp.float32) for k in (*METRICS, "loss")}
    sums["count"] = jnp.zeros((), jnp.int32)
    sums["first_bad"] = jnp.full((), -1, jnp.int32)
    return sums


@eqx.filter_jit
def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(
        eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _all_finite(tree: Any) -> bool:
    return bool(_finite(tree))


# ---------------------------------------------------------------- Ctrl+C

class _Interrupt:
    """First SIGINT (Ctrl+C) or SIGTERM (a job scheduler's notice before it
    kills the job): ask the loop to checkpoint and stop. Second: quit at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_Interrupt":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a library caller): no handler
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train_record(cfg: Config, sums: dict, step: int, time_s: float, steps_per_s: float,
                 lr: float) -> dict:
    """The metrics.jsonl line of one log interval, from its summed metrics
    (host values of one run: `sums[k]` are scalars)."""
    count = max(int(sums["count"]), 1)
    record = {"kind": "train", "step": step, "mode": cfg.sequences.train_kind,
              "time": round(time_s, 3), "steps_per_s": round(steps_per_s, 3),
              "lr": float(f"{lr:.6g}"), "loss": float(sums["loss"]) / count}
    record.update({k: float(sums[k]) / count for k in METRICS})
    return record


def checkpoint_and_evaluate(done: int, total: int, r: config_mod.RunConfig, save, evaluate,
                            view) -> None:
    """The end of a step: checkpoint first (so a failing evaluation loses no
    training), then evaluate, at their intervals and at the last step."""
    if done == total:
        save(done, final=True)
    elif done % r.checkpoint_every == 0:
        save(done)
    if done % r.eval_every == 0 or done == total:
        evaluate(done, view)


# ---------------------------------------------------------------- the loop

def _restore(run_dir: Path, model, state, opt_state):
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for path in runs.remove_stale_temp_files(run_dir):
        display.warn(f"removed {path.name}, a checkpoint whose write was cut short")
    found = list(runs.iter_newest_first(run_dir))
    for step, path in found:
        try:
            return checkpoint.load(path, model=model, state=state, opt_state=opt_state)
        except checkpoint.CheckpointMismatch:
            raise  # the config changed, not the file: do not silently go back
        except checkpoint.CheckpointError as e:
            display.warn(f"skipping {path.name}: {e}")
    if found:
        raise EiclError(f"no intact checkpoint in {runs.checkpoint_dir(run_dir)} "
                        f"({len(found)} corrupt); start a new run instead")
    return None


def train(cfg: Config, run_dir: Path, *, resume: bool = False, live: bool | None = None,
          dataset: Any = None) -> Outcome:
    """Train (or continue) the run in `run_dir` up to cfg.run.steps. `dataset`
    saves loading it again when the caller already has it. The process that
    writes the run holds its lock throughout: a second trainer is refused."""
    writer = parallel.is_writer()  # only process 0 writes run files
    with runs.train_lock(run_dir) if writer else contextlib.nullcontext():
        return _train(cfg, run_dir, resume=resume, live=live, dataset=dataset, writer=writer)


def check_stem_impl(cfg: Config, n_devices: int, backend: str) -> None:
    """Refuse the stem's Pallas kernels on a data mesh of GPUs: XLA cannot
    split a kernel's batch over devices the way it splits its own ops, and
    that has not been tried on a GPU."""
    e = cfg.embedding
    if (e.example_encoder == "resnet" and e.stem_impl == "pallas" and n_devices > 1
            and backend == "gpu"):
        raise EiclError(f"embedding.stem_impl = 'pallas' runs on one GPU per run, not split "
                        f"over {n_devices} devices; use 'auto' here (or one GPU per run, "
                        "e.g. CUDA_VISIBLE_DEVICES=0)")


def placement(cfg: Config) -> parallel.Placement:
    """Where the step's arrays go on this process's devices (one device: as
    is; several: a data mesh), or a one-line refusal of what cannot run
    there. The CLI calls it before making a run folder, so a refusal leaves
    none."""
    place = parallel.Placement.for_batch(cfg.train.batch_size)
    check_stem_impl(cfg, place.n_devices, jax.default_backend())
    return place


def _train(cfg: Config, run_dir: Path, *, resume: bool, live: bool | None,
           dataset: Any, writer: bool) -> Outcome:
    from .data.dataset import load_dataset
    from .data.sequences import SequenceGenerator

    run_dir = Path(run_dir)
    if dataset is None:
        dataset = load_dataset(cfg)
    if resume and cfg.data.cache_sha256 and dataset.cache_sha256 != cfg.data.cache_sha256:
        display.warn(f"the data cache {dataset.cache_file} differs from the one this run "
                     "started with (sha256 changed); continuing with the new one")
    cfg = with_cache_identity(cfg, dataset.cache_file, dataset.cache_sha256)
    config_toml = config_mod.to_toml(cfg)
    generator = SequenceGenerator(dataset, cfg)
    data = device_data(dataset, cfg)
    image_shape = tuple(dataset.images.shape[1:])

    model, state, opt_state, step_key = initial_state(cfg, image_shape)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.run.steps)

    start, elapsed_before = 0, 0.0
    if resume:
        restored = _restore(run_dir, model, state, opt_state)
        if restored is None:
            display.warn(f"{run_dir} has no checkpoint yet; starting from step 0")
        else:
            model, state, opt_state = restored.model, restored.state, restored.opt_state
            start = restored.step
            elapsed_before = float(restored.metadata.get("elapsed", 0.0))
    total = cfg.run.steps
    if start >= total:  # nothing to train: the run's files stay as they are
        return Outcome(run_dir, start, "already_done")
    if resume and writer:
        if start:
            display.info(f"resuming {run_dir} from step {start} "
                         f"({runs.checkpoint_path(run_dir, start).name})")
        runs.truncate_metrics(run_dir, start)
        if (run_dir / runs.CONFIG_FILE).read_text() != config_toml:
            runs.write_config(run_dir, cfg)  # continues under the changed keys (--set)
    per_call = steps_per_call(cfg.train.steps_per_call)
    if writer:
        # The steps per call change the rounding: record the K this start ran.
        runs.append_environment(run_dir, {**environment.record(start),
                                          "steps_per_call": per_call})

    masks = device_label_masks(generator, cfg.sequences.train_kind)
    step_fn = make_train_step(cfg)
    # One device: as is. Several (or several hosts): batch split over a data
    # mesh, everything else replicated (parallel.py).
    place = placement(cfg)
    consts, model, state, opt_state = place.replicate(
        ((data, masks, step_key), model, state, opt_state))
    data = consts[0]
    carry = Carry.pack(model, state, opt_state)
    r = cfg.run
    t0 = time.perf_counter()

    def now() -> float:
        return elapsed_before + time.perf_counter() - t0

    def save(step: int, final: bool = False) -> None:
        model, state, opt_state = carry.unpack()
        if not _all_finite(model):
            raise TrainingDiverged(
                f"parameters became non-finite before step {step}; kept the last good "
                f"checkpoint in {runs.checkpoint_dir(run_dir)}")
        if not writer:
            return
        checkpoint.save(runs.checkpoint_path(run_dir, step), step=step, model=model,
                        state=state, opt_state=opt_state, config_toml=config_toml,
                        final=final, extra={"elapsed": f"{now():.3f}"})
        checkpoint.prune(runs.list_checkpoints(run_dir), r.keep_checkpoints)

    def check_finite(sums_host: dict, upto: int) -> None:
        bad = int(sums_host["first_bad"])
        if bad >= 0 or not math.isfinite(float(sums_host["loss"])):
            where = f"step {bad + 1}" if bad >= 0 else f"a step before {upto}"
            raise TrainingDiverged(
                f"training loss became non-finite at {where}; stopped, keeping the last good "
                f"checkpoint in {runs.checkpoint_dir(run_dir)} (try a lower optimizer.max_lr)")

    def evaluate(step: int, view: display.TrainDisplay) -> None:
        model, state, opt_state = carry.unpack()
        model = evaluation_model(model, opt_state)
        started = time.perf_counter()
        results = evaluate_modes(model, state, data, generator, list(cfg.eval.modes),
                                 cfg.eval.train_sequences, cfg.eval.batch_size, cfg.eval.seed)
        took = time.perf_counter() - started
        for mode, m in results.items():
            if writer:
                runs.append_metrics(run_dir, {"kind": "eval", "step": step, "mode": mode,
                                              "time": round(now(), 3), **m,
                                              "sequences_per_s": m["sequences"] / max(took, 1e-9)})
        view.eval_table(step, table_rows(cfg, results), elapsed=now())

    def batches(step: int, n: int) -> dict[str, jax.Array]:
        """The batches of steps step .. step + n - 1 on the device (one call's)."""
        return place.batch(train_fields(generator, step, n), steps_first=n > 1)

    sums = place.replicate(zero_sums())
    sizes = call_plan(start, total, per_call,
                      (r.log_every, r.eval_every, r.checkpoint_every))
    step, n = start, next(sizes)
    batch = batches(step, n)
    last_log_step, last_log_time = start, time.perf_counter()
    with _Interrupt() as interrupt, display.TrainDisplay(total, start, live=live) as view:
        while n:
            carry, sums = step_fn.call(consts, carry, batch, step, n, sums)
            done = step + n
            step, n = done, next(sizes, 0)
            if n:  # drawn on the host while the device computes
                batch = batches(step, n)

            if done % r.log_every == 0 or done == total or interrupt.requested:
                host = jax.device_get(sums)
                check_finite(host, done)
                t = time.perf_counter()
                sps = (done - last_log_step) / max(t - last_log_time, 1e-9)
                record = train_record(cfg, host, done, now(), sps, float(schedule(done - 1)))
                if writer:
                    runs.append_metrics(run_dir, record)
                view.log(done, record["loss"], record["accuracy_query"], sps, record["lr"])
                sums = place.replicate(zero_sums())
                last_log_step, last_log_time = done, t

            paused = time.perf_counter()
            if interrupt.requested and done < total:
                save(done)
                return Outcome(run_dir, done, "interrupted")
            checkpoint_and_evaluate(done, total, r, save, evaluate, view)
            # Evaluation and checkpoint time is not training time.
            last_log_time += time.perf_counter() - paused
    return Outcome(run_dir, total, "finished")
