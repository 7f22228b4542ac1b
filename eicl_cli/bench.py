"""`eicl bench`: how fast this machine generates, trains and evaluates a config.

Per config it measures, in one process:
- the batch generator's training sequences per second (host, one thread);
- the train step's compile time, apart from the steady state;
- steady-state training steps/s and sequences/s, run exactly as the training
  loop runs it: the next batch is drawn on the host while the device works on
  the current step, and the host waits for the device only once, at the end
  of the timed window (so asynchronous dispatch on a GPU is measured, not
  defeated);
- how fast the loop's host side draws a call's batches (all stacked runs',
  by the batch workers if it has them), apart from the step;
- evaluation sequences/s (one mode, after its compilation);
- peak host memory (RSS) and, where the device reports it, peak device memory.

With `stack` K > 1 the step is the stacked one (stack.py): K replicas of the
model, each on its own data stream, in one jitted step, their batches drawn
by worker processes where train.draw_workers says so (data/batch_workers.py).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from . import config as config_mod
from .config import Config
from .flat_step import call_plan, steps_per_call

# The configs `eicl bench` measures when none is given: the paper's and a small one.
DEFAULT_CONFIGS = ("images_all_exemplars.toml", "quickstart.toml")


def default_config_paths() -> list[Path]:
    """The shipped paper and quickstart configs (configs/ next to the package)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    return [root / name for name in DEFAULT_CONFIGS]


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "") or d.platform
    n = jax.device_count()
    if d.platform == "cpu":
        kind = f"cpu ({platform.processor() or platform.machine()})"
    return f"{n} x {kind}" if n > 1 else kind


def peak_memory() -> dict[str, float | None]:
    """Peak host RSS (whole process so far) and peak device bytes if reported."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    device = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        device = float(stats["peak_bytes_in_use"])
    return {"peak_host_rss_gb": round(host / 2**30, 3),
            "peak_device_gb": round(device / 2**30, 3) if device is not None else None}


def _rate(fn, seconds: float) -> float:
    """Calls per second of fn() over about `seconds`, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        fn()
        calls += 1
    return calls / elapsed


def _block(tree: Any) -> None:
    jax.block_until_ready(jax.tree_util.tree_leaves(tree))


class StepRunner:
    """Training steps of one config (or K stacked copies of it, seeds
    seed..seed+K-1) exactly as the training loop runs them: the next batch
    is drawn on the host while the device works, and the host waits for the
    device only at the end of `run`."""

    def __init__(self, cfg: Config, dataset: Any, data: Any, generator: Any, stack: int = 1):
        from .evaluate import device_label_masks
        from .flat_step import Carry
        from .data.sequences import train_fields

        self.stack = stack
        self.per_call = steps_per_call(cfg.train.steps_per_call)
        self.batch_size = cfg.train.batch_size
        self._trainer = None
        if stack > 1:
            from . import stack as stack_mod
            cfgs = [cfg.replace(run=dataclasses.replace(cfg.run, seed=cfg.run.seed + i))
                    for i in range(stack)]
            trainer = self._trainer = stack_mod.StackedState.fresh(cfgs, dataset, data)
            self._batches = trainer.batch
            self._step_fn = stack_mod.make_stacked_step(cfg)
            self._consts = trainer.consts
            self.carry, self.sums = trainer.carry, trainer.sums
        else:
            from .train import initial_state, make_train_step, zero_sums
            model, state, opt_state, step_key = initial_state(
                cfg, tuple(dataset.images.shape[1:]))
            self._batches = lambda step, k: {
                name: jnp.asarray(a) for name, a in train_fields(generator, step, k).items()}
            self._step_fn = make_train_step(cfg)
            self._consts = (data, device_label_masks(generator, cfg.sequences.train_kind),
                            step_key)
            self.carry, self.sums = Carry.pack(model, state, opt_state), zero_sums()

    def run(self, first: int, n: int) -> None:
        """Steps first .. first + n - 1, then wait for the device; calls of
        train.steps_per_call steps, as the training loop makes them."""
        sizes = call_plan(first, first + n, self.per_call, ())
        step, k = first, next(sizes, 0)
        batch = self._batches(step, k) if k else None
        while k:
            self.carry, self.sums = self._step_fn.call(self._consts, self.carry, batch, step, k,
                                                       self.sums)
            step, k = step + k, next(sizes, 0)
            if k:
                batch = self._batches(step, k)  # drawn while the device computes
        _block((self.carry.leaves, self.sums))

    @property
    def draw_workers(self) -> int:
        """Processes drawing the stacked runs' batches (0: drawn in-process)."""
        return self._trainer.draw_workers if self._trainer is not None else 0

    def draw_rate(self, seconds: float) -> float:
        """Sequences per second of drawing calls' batches as `run` draws
        them (all runs', on the device; by the batch workers if any)."""
        counter = iter(range(0, 10**12, self.per_call))
        batch_rate = _rate(lambda: _block(self._batches(next(counter), self.per_call)), seconds)
        return batch_rate * self.per_call * self.stack * self.batch_size

    def close(self) -> None:
        """Stop the stacked runs' batch workers, if any."""
        if self._trainer is not None:
            self._trainer.close()

    def first_call(self, k: int) -> tuple[Any, tuple]:
        """The jitted function of a call of k steps from step 0 and its
        arguments, as `run` would pass them: for compiling it elsewhere
        (benchmarks/gpu/gpu_program.py compiles it for a GPU without one)."""
        args = (self._consts, self.carry.leaves, self._batches(0, k),
                jnp.asarray(0, jnp.int32), self.sums)
        return self._step_fn.jitted(self.carry.treedef, k), args

    def model_and_state(self) -> tuple[Any, Any]:
        """The (first) run's model and batch-norm state."""
        model, state, _ = self.carry.unpack()
        if self.stack > 1:
            from .stack import replica
            model, state = replica(model, 0), replica(state, 0)
        return model, state


def _time_training(runner: StepRunner, steps: int, draw_seconds: float) -> dict[str, Any]:
    """Compile time apart, then the steady state over about `steps` steps
    (whole calls), then how fast the host draws the calls' batches."""
    per_call = runner.per_call
    steps = -(-steps // per_call) * per_call  # whole calls only: no second compilation
    started = time.perf_counter()
    runner.run(0, per_call)
    first_call = time.perf_counter() - started
    runner.run(per_call, per_call)  # a second untimed call: any one-off work after compiling
    started = time.perf_counter()
    runner.run(2 * per_call, steps)
    took = time.perf_counter() - started
    step_s = took / steps
    return {"steps_per_call": per_call, "draw_workers": runner.draw_workers,
            "draw_sequences_per_s": round(runner.draw_rate(draw_seconds), 1),
            "compile_s": round(max(first_call - step_s * per_call, 0.0), 2),
            "train_steps": steps, "train_steps_per_s": round(steps / took, 3),
            "train_sequences_per_s": round(steps * runner.batch_size * runner.stack / took, 1),
            "step_ms": round(1000 * step_s, 2)}


def bench_config(cfg: Config, *, steps: int, stack: int = 1, name: str = "",
                 overrides: list[str] | None = None, generator_seconds: float = 1.0,
                 eval_sequences: int | None = None, dataset: Any = None) -> dict[str, Any]:
    """Measure one config; returns the figures as a flat JSON-ready dict.
    `overrides` (the --set values the config was loaded with) are recorded
    with them, so that A/B lines of one config stay apart."""
    from .data.dataset import load_dataset
    from .data.sequences import SequenceGenerator
    from .evaluate import evaluate_modes
    from .inputs import device_data

    if steps < 1:
        raise ValueError("steps must be >= 1")
    if dataset is None:
        dataset = load_dataset(cfg)
    b = cfg.train.batch_size
    # XLA_FLAGS changes the compiled step as much as --set does (GPU command
    # buffers, autotuning), so it goes on the line too.
    out: dict[str, Any] = {"config": name, "set": list(overrides or []),
                           "xla_flags": os.environ.get("XLA_FLAGS") or None,
                           "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None,
                           "device": device_description(), "jax_version": jax.__version__,
                           "jax_backend": jax.default_backend(), "stack": stack,
                           "batch_size": b, "image_shape": list(dataset.images.shape[1:])}

    generator = SequenceGenerator(dataset, cfg)
    counter = iter(range(10**12))
    out["generator_sequences_per_s"] = round(
        _rate(lambda: generator.train_batch(next(counter)), generator_seconds) * b, 1)

    data = device_data(dataset, cfg)
    runner = StepRunner(cfg, dataset, data, generator, stack)
    try:
        out.update(_time_training(runner, steps, generator_seconds))
        model, state = runner.model_and_state()
    finally:
        runner.close()

    # Evaluation of one replica: the first eval mode, after its compilation.
    mode = cfg.eval.modes[0]
    eval_batch = cfg.eval.batch_size
    if jax.default_backend() == "cpu":
        eval_batch = min(eval_batch, 128)
    n_eval = eval_sequences or 2 * eval_batch
    evaluate_modes(model, state, data, generator, [mode], eval_batch, eval_batch, cfg.eval.seed)
    started = time.perf_counter()
    evaluate_modes(model, state, data, generator, [mode], n_eval, eval_batch, cfg.eval.seed)
    out["eval_mode"] = mode
    out["eval_batch_size"] = eval_batch
    out["eval_sequences_per_s"] = round(n_eval / (time.perf_counter() - started), 1)
    out.update(peak_memory())
    return out


def load_for_bench(path: Path, overrides: list[str] | None = None) -> Config:
    return config_mod.load(path, overrides or [])


def default_steps(cfg: Config) -> int:
    """Timed steps when --steps is not given: a few for a ResNet on a CPU
    (seconds each), enough for a steady state elsewhere."""
    if jax.default_backend() == "cpu" and cfg.embedding.example_encoder == "resnet":
        return 3
    return 100 if jax.default_backend() == "cpu" else 300
