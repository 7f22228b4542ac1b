"""The training loop, for one run, K stacked runs and the bench alike.

One jitted step does everything on the device: gather the batch's images
from the device-resident dataset, augment and noise them, run the model,
take the gradient and apply the optimizer. The host only draws the next
batch's small index arrays (a pure function of run.seed and the step) while
the device runs the current step, and waits for the device only at log,
eval and checkpoint steps.

`run_steps` is the loop itself; `train_runs` wraps it with what a run folder
needs: the lock, resuming from the newest intact checkpoint, metrics lines,
evaluations and checkpoints at their intervals, and Ctrl+C.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint, display, environment, runs, tracking
from .. import config as config_mod
from ..config import Config
from ..errors import EiclError, first_line
from ..files import read_text
from ..evaluate import evaluate_modes, table_rows
from ..inputs import device_data
from ..metrics import METRIC_NAMES
from ..optim import evaluation_model, learning_rate_schedule
from ..parallel import is_writer
from .flat_step import call_plan
from .preflight import placement, with_cache_identity
from .step import all_finite
from .trainer import Trainer, check_stackable


class TrainingDiverged(EiclError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Outcome:
    step: int
    status: str  # "finished" | "interrupted" | "already_done"


class Interrupt:
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

    def __enter__(self) -> "Interrupt":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a library caller): no handler
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- the loop

def run_steps(trainer: Trainer, start: int, total: int, *, intervals: tuple[int, ...] = (),
              points: Sequence[int] = (),
              on_log: Callable[[int, float], None] | None = None,
              on_step: Callable[[int], None] | None = None,
              stop: Callable[[], bool] = lambda: False) -> int:
    """Advance the trainer from step `start` to `total` and return the step
    reached. `intervals` = (log, eval, checkpoint every): no device call
    crosses one of their multiples, nor one of the `points`. At a log step
    (and the last, or a stop) `on_log(done, steps_per_s)` reads the sums;
    after every call `on_step(done)` may checkpoint and evaluate. `stop()` true ends the loop
    after the current call (the caller saves)."""
    log_every = intervals[0] if intervals else 0
    sizes = call_plan(start, total, trainer.per_call, intervals, points)
    step, n = start, next(sizes, 0)
    batch = trainer.batch(step, n) if n else None
    last_log_step, last_log_time = start, time.perf_counter()
    while n:
        trainer.advance(batch, step, n)
        done = step + n
        step, n = done, next(sizes, 0)
        if n:  # drawn on the host while the device computes
            batch = trainer.batch(step, n)

        stopping = stop()
        if on_log is not None and (
                (log_every and done % log_every == 0) or done == total or stopping):
            t = time.perf_counter()
            on_log(done, (done - last_log_step) / max(t - last_log_time, 1e-9))
            trainer.reset_sums()
            last_log_step, last_log_time = done, t
        if stopping and done < total:
            return done
        paused = time.perf_counter()
        if on_step is not None:
            on_step(done)
        # Evaluation and checkpoint time is not training time.
        last_log_time += time.perf_counter() - paused
    return total


# ---------------------------------------------------------------- run folders

def train_record(cfg: Config, sums: dict, step: int, time_s: float, steps_per_s: float,
                 lr: float) -> dict:
    """The metrics.jsonl line of one log interval, from its summed metrics
    (host values of one run: `sums[k]` are scalars)."""
    count = max(int(sums["count"]), 1)
    record = {"kind": "train", "step": step, "mode": cfg.sequences.train_kind,
              "time": round(time_s, 3), "steps_per_s": round(steps_per_s, 3),
              "lr": float(f"{lr:.6g}"), "loss": float(sums["loss"]) / count}
    record.update({k: float(sums[k]) / count for k in METRIC_NAMES})
    return record


def restore_newest(run_dir: Path, cfg: Config, model: Any, state: Any,
                   opt_state: Any) -> checkpoint.Loaded | None:
    """The run's newest checkpoint that loads into these trees (corrupt ones
    skipped with a warning), or None if it has none yet. One written under
    another config (`cfg` is the one the run continues with) is refused."""
    for path in runs.remove_stale_temp_files(run_dir):
        display.warn(f"removed {path.name}, a checkpoint whose write was cut short")

    def load(path: Path) -> checkpoint.Loaded:
        snapshot = checkpoint.read_snapshot(path)
        checkpoint.check_config(
            snapshot, cfg, f"the run's ({run_dir / runs.CONFIG_FILE}, with any --set)",
            "a run continues only under the config it was trained with (--set may change "
            "the run keys but run.seed, the eval keys, and where and how it runs)")
        return checkpoint.load(snapshot, model=model, state=state, opt_state=opt_state)

    return checkpoint.load_newest(lambda: runs.iter_newest_first(run_dir),
                                  runs.checkpoint_dir(run_dir), display.warn, load)


def train_runs(cfgs: list[Config], run_dirs: list[Path], *, resume: bool = False,
               live: bool | None = None, dataset: Any = None) -> Outcome:
    """Train (or continue) K run folders up to run.steps: K = 1 as `eicl
    train`, K > 1 in one stacked step. Each folder already holds its
    config.toml; with `resume` (always, for a stack) folders with checkpoints
    continue from their newest intact one, all then at one step. The process
    that writes the runs holds their locks throughout: a second trainer is
    refused. `dataset` saves loading it again when the caller has it."""
    writer = is_writer()  # only process 0 of a multi-host run writes run files
    if writer:
        tracking.check_installed(cfgs)
    with contextlib.ExitStack() as held:
        if writer:
            for run_dir in run_dirs:
                held.enter_context(runs.train_lock(run_dir))
        return _train(list(cfgs), [Path(d) for d in run_dirs], resume or len(cfgs) > 1,
                      live, dataset, writer)


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is the host (MemoryError) or XLA (RESOURCE_EXHAUSTED)
    refusing an allocation."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)[:500]


def _train(cfgs: list[Config], run_dirs: list[Path], resume: bool, live: bool | None,
           dataset: Any, writer: bool) -> Outcome:
    from ..data.dataset import load_dataset

    names = [d.name for d in run_dirs]
    check_stackable(cfgs, names)
    if dataset is None:
        dataset = load_dataset(cfgs[0])
    for cfg in cfgs:
        if resume and cfg.data.cache_sha256 and dataset.cache_sha256 != cfg.data.cache_sha256:
            display.warn(f"the data cache {dataset.cache_file} differs from the one this run "
                         "started with (sha256 changed); continuing with the new one")
    cfgs = [with_cache_identity(c, dataset.cache_file, dataset.cache_sha256) for c in cfgs]
    tomls = [config_mod.to_toml(c) for c in cfgs]
    stacked = len(cfgs) > 1
    doing = "building the model and optimizer state"
    try:
        data = device_data(dataset, cfgs[0])
        trainer = Trainer(cfgs, dataset, data, None if stacked else placement(cfgs[0]))
        doing = "training"
        try:
            return _loop(trainer, cfgs, run_dirs, names, tomls, resume, live, writer)
        finally:
            trainer.close()
    except Exception as e:
        if not out_of_memory(e):
            raise
        raise EiclError(f"out of memory {doing} {', '.join(names)} ({first_line(e)}); reduce "
                        "train.batch_size or the model's size, or use a device with more "
                        "memory") from None


def _loop(trainer: Trainer, cfgs: list[Config], run_dirs: list[Path], names: list[str],
          tomls: list[str], resume: bool, live: bool | None, writer: bool) -> Outcome:
    stacked = trainer.stacked
    starts, elapsed, trees = [], [], []
    for i, run_dir in enumerate(run_dirs):
        fresh = trainer.run(i)
        restored = restore_newest(run_dir, cfgs[i], *fresh) if resume else None
        if resume and restored is None and not stacked:
            display.warn(f"{run_dir} has no checkpoint yet; starting from step 0")
        starts.append(restored.step if restored else 0)
        elapsed.append(float(restored.metadata.get("elapsed", 0.0)) if restored else 0.0)
        trees.append((restored.model, restored.state, restored.opt_state) if restored else fresh)
    if len(set(starts)) > 1:
        detail = ", ".join(f"{n} at {s}" for n, s in zip(names, starts))
        raise EiclError(f"stacked runs must resume from one step ({detail}); "
                        "continue them separately or in groups of equal steps")
    start, total = starts[0], cfgs[0].run.steps
    if start >= total:  # nothing to train: the runs' files stay as they are
        return Outcome(start, "already_done")
    if start:
        trainer.set_runs(trees)
    if writer:
        env = {**environment.record(start), "steps_per_call": trainer.per_call}
        if stacked:
            env.update(stacked_with=len(cfgs), draw_workers=trainer.draw_workers)
        for run_dir, cfg in zip(run_dirs, cfgs):
            if start and not stacked:
                display.info(f"resuming {run_dir} from step {start} "
                             f"({runs.checkpoint_path(run_dir, start).name})")
            runs.truncate_metrics(run_dir, start)
            # The config it continues under may change the keys that leave the run
            # what it was (--set run.steps); restore_newest refused any other change.
            if read_text(run_dir / runs.CONFIG_FILE, "run config") != runs.config_text(cfg):
                runs.write_config(run_dir, cfg)
            # The steps per call change the rounding: record the K this start ran.
            runs.append_environment(run_dir, env)

    r = cfgs[0].run
    kept = set(config_mod.dynamics_steps(r))
    schedule = learning_rate_schedule(cfgs[0].optimizer, total)
    t0 = time.perf_counter()

    def now(i: int) -> float:
        return elapsed[i] + time.perf_counter() - t0

    def emit(i: int, record: dict) -> None:
        # metrics.jsonl first: it is the record, the trackers only show it.
        runs.append_metrics(run_dirs[i], record)
        for tracker in trackers[i]:
            tracker.log(record)

    def who(i: int) -> str:
        return f"{names[i]}: " if stacked else ""

    def save(step: int, final: bool = False) -> None:
        for i, run_dir in enumerate(run_dirs):
            model, state, opt_state = trainer.run(i)
            if not all_finite(model):
                raise TrainingDiverged(
                    f"{who(i)}parameters became non-finite before step {step}; kept the last "
                    f"good checkpoint in {runs.checkpoint_dir(run_dir)}")
            if writer:
                checkpoint.save(runs.checkpoint_path(run_dir, step), step=step, model=model,
                                state=state, opt_state=opt_state, config_toml=tomls[i],
                                final=final, extra={"elapsed": f"{now(i):.3f}"})
                checkpoint.prune(runs.list_checkpoints(run_dir), r.keep_checkpoints)

    def keep_for_dynamics(step: int) -> None:
        # The weights evaluation uses (the moving average, if kept), without the
        # optimizer state: a third of a resume checkpoint's size under Adam.
        if not writer:
            return
        for i, run_dir in enumerate(run_dirs):
            model, state, opt_state = trainer.run(i)
            runs.make_dir(runs.dynamics_dir(run_dir), "dynamics folder")
            checkpoint.save(runs.dynamics_path(run_dir, step), step=step,
                            model=evaluation_model(model, opt_state), state=state,
                            opt_state=None, config_toml=tomls[i],
                            extra={"kind": checkpoint.DYNAMICS, "elapsed": f"{now(i):.3f}"})

    def evaluate(step: int) -> None:
        for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            model, state, opt_state = trainer.run(i)
            started = time.perf_counter()
            results = evaluate_modes(evaluation_model(model, opt_state), state, trainer.data,
                                     trainer.generators[i], list(cfg.eval.modes),
                                     cfg.eval.train_sequences, cfg.eval.batch_size,
                                     cfg.eval.seed)
            took, at = time.perf_counter() - started, round(now(i), 3)
            if writer:
                for mode, m in results.items():
                    emit(i, {
                        "kind": "eval", "step": step, "mode": mode, "time": at,
                        **m, "sequences_per_s": m["sequences"] / max(took, 1e-9)})
            if stacked:
                view.print(f"{names[i]}:")
            view.eval_table(step, table_rows(cfg, results), elapsed=at)

    def log(done: int, sps: float) -> None:
        lr = float(schedule(done - 1))
        records = []
        for i, (cfg, sums) in enumerate(zip(cfgs, trainer.host_sums())):
            bad = int(sums["first_bad"])
            if bad >= 0 or not math.isfinite(float(sums["loss"])):
                where = f"step {bad + 1}" if bad >= 0 else f"a step before {done}"
                raise TrainingDiverged(
                    f"{who(i)}training loss became non-finite at {where}; stopped, keeping the "
                    f"last good checkpoint in {runs.checkpoint_dir(run_dirs[i])} (try a lower "
                    "optimizer.max_lr)")
            records.append(train_record(cfg, sums, done, now(i), sps, lr))
            if writer:
                emit(i, records[-1])
        view.log(done, float(np.mean([rec["loss"] for rec in records])),
                 float(np.mean([rec["accuracy_query"] for rec in records])), sps, lr)

    def at_step(done: int) -> None:
        # Checkpoint first, so that a failing evaluation loses no training.
        if done == total:
            save(done, final=True)
        elif done % r.checkpoint_every == 0:
            save(done)
        if done in kept:
            keep_for_dynamics(done)
        if done % r.eval_every == 0 or done == total:
            evaluate(done)

    trackers: list[list[tracking.Tracker]] = [[] for _ in cfgs]
    try:
        if writer:
            for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
                trackers[i] = tracking.open_trackers(cfg, run_dir, start)
        with Interrupt() as interrupt, display.TrainDisplay(total, start, live=live) as view:
            done = run_steps(trainer, start, total,
                             intervals=(r.log_every, r.eval_every, r.checkpoint_every),
                             points=sorted(kept),
                             on_log=log, on_step=at_step, stop=lambda: interrupt.requested)
            if done < total:
                save(done)
                return Outcome(done, "interrupted")
        return Outcome(total, "finished")
    finally:
        for opened in trackers:
            tracking.close_all(opened)
