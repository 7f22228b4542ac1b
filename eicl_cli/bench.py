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

Training is timed through the training loop itself (training/loop.py), as
`eicl train` runs it. With `stack` K > 1 the step is the stacked one
(training/trainer.py): K replicas of the model, each on its own data stream,
in one jitted step, their batches drawn by worker processes where
train.draw_workers says so (data/batch_workers.py).
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

from . import config as config_mod
from .config import Config
from .training.loop import run_steps
from .training.trainer import Trainer

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


def _time_training(trainer: Trainer, steps: int, draw_seconds: float) -> dict[str, Any]:
    """Compile time apart, then the steady state over about `steps` steps
    (whole calls) run by the training loop with nothing to log, evaluate or
    save, then how fast the host draws the calls' batches."""
    per_call = trainer.per_call
    steps = -(-steps // per_call) * per_call  # whole calls only: no second compilation

    def timed(first: int, n: int) -> float:
        started = time.perf_counter()
        run_steps(trainer, first, first + n)
        _block((trainer.carry.leaves, trainer.sums))
        return time.perf_counter() - started

    first_call = timed(0, per_call)
    timed(per_call, per_call)  # a second untimed call: any one-off work after compiling
    took = timed(2 * per_call, steps)
    step_s = took / steps
    counter = iter(range(0, 10**12, per_call))
    batch_rate = _rate(lambda: _block(trainer.batch(next(counter), per_call)), draw_seconds)
    sequences = len(trainer.cfgs) * trainer.cfgs[0].train.batch_size  # per step
    return {"steps_per_call": per_call, "draw_workers": trainer.draw_workers,
            "draw_sequences_per_s": round(batch_rate * per_call * sequences, 1),
            "compile_s": round(max(first_call - step_s * per_call, 0.0), 2),
            "train_steps": steps, "train_steps_per_s": round(steps / took, 3),
            "train_sequences_per_s": round(steps * sequences / took, 1),
            "step_ms": round(1000 * step_s, 2)}


def bench_trainer(cfg: Config, dataset: Any, data: Any, stack: int = 1) -> Trainer:
    """The runs `eicl bench` times: the config alone, or K stacked copies of
    it at seeds seed..seed+K-1, on this machine's default device."""
    cfgs = [cfg.replace(run=dataclasses.replace(cfg.run, seed=cfg.run.seed + i))
            for i in range(stack)]
    return Trainer(cfgs, dataset, data)


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
    trainer = bench_trainer(cfg, dataset, data, stack)
    try:
        out.update(_time_training(trainer, steps, generator_seconds))
        model, state, _ = trainer.run(0)
    finally:
        trainer.close()

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
