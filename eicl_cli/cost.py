"""What a sweep will cost: the expected training time per run and in all,
from a steps/s figure that is given (say, a GPU's from `eicl bench`) or
measured here on the default device, one figure per compiled program.

Runs with equal `experiment_keys.stack_identity` compile to the same step, so one
measurement covers them all. With `--stack K` the sweep trains up to K such
runs (at equal progress) in one stacked step, which costs more than one run's
step but much less than K of them; the figure is then a K-stack step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import Config
from .errors import EiclError


@dataclass(frozen=True)
class RunCost:
    name: str
    steps_left: int
    steps_per_s: float | None    # of the (stacked) step this run trains in
    seconds: float               # of the task it trains in; 0 when nothing is left
    stacked_with: int            # runs in that task, itself included


@dataclass(frozen=True)
class SweepCost:
    runs: list[RunCost]
    seconds: float               # every task, one after another
    source: str                  # where the steps/s came from
    stack: int
    unavailable: str = ""        # why there is no estimate (say, no data cache to measure with)


@dataclass(frozen=True)
class PendingRun:
    name: str
    config: Config
    done: int                    # steps already trained (0 for a new run)


def _tasks(pending: list[PendingRun], stack: int) -> list[list[PendingRun]]:
    """The sweep's own grouping of runs into stacked tasks."""
    from .sweep.local import stack_groups
    return stack_groups(pending, lambda run: run.config, lambda run: run.done, stack)


def estimate(pending: list[PendingRun], stack: int, rate: Callable[[Config, int], float],
             source: str) -> SweepCost:
    """Seconds per run and in all. `rate(cfg, k)`: steps/s of a step of k
    stacked runs of cfg's shapes (k = 1: one plain run)."""
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    left = [r for r in pending if r.config.run.steps > r.done]
    costs = {r.name: RunCost(r.name, 0, None, 0.0, 1) for r in pending if r not in left}
    total = 0.0
    for task in _tasks(left, stack):
        steps_per_s = rate(task[0].config, len(task))
        if not steps_per_s > 0:
            raise EiclError(f"steps/s {steps_per_s}: must be > 0")
        steps = task[0].config.run.steps - task[0].done
        seconds = steps / steps_per_s
        total += seconds
        for r in task:
            costs[r.name] = RunCost(r.name, steps, steps_per_s, seconds, len(task))
    return SweepCost([costs[r.name] for r in pending], total, source, stack)


def check_steps_per_s(steps_per_s: float) -> None:
    if not steps_per_s > 0:
        raise EiclError(f"--steps-per-s {steps_per_s:g}: must be > 0 (steps per second "
                        "of one training step, e.g. `eicl bench`'s train steps/s)")


def given_rate(steps_per_s: float) -> Callable[[Config, int], float]:
    """One figure for every run: a (stacked, with --stack) step's steps/s."""
    check_steps_per_s(steps_per_s)
    return lambda cfg, k: steps_per_s


def measured_rate(stack: int, steps: int | None = None,
                  on_measure: Callable[[Config, int], None] | None = None
                  ) -> Callable[[Config, int], float]:
    """Steps/s measured on this machine's default device by `eicl bench`'s
    code, once per compiled program (stack key and stack size): a few steps
    after compilation. Stacked tasks are measured stacked, with the sweep's K."""
    from . import bench
    from .experiment_keys import stack_identity
    measured: dict[tuple[str, int], float] = {}

    def rate(cfg: Config, k: int) -> float:
        k = stack if k > 1 else 1  # a shorter last task is costed as a full stack
        key = (stack_identity(cfg), k)
        if key not in measured:
            if on_measure is not None:
                on_measure(cfg, k)
            result = bench.bench_config(cfg, steps=steps or bench.default_steps(cfg), stack=k,
                                        generator_seconds=0.2, eval_sequences=cfg.eval.batch_size)
            measured[key] = float(result["train_steps_per_s"])
        return measured[key]
    return rate


def measured_source() -> str:
    from . import bench
    return f"measured on {bench.device_description()}"


def sweep_cost(sweep_runs: list, statuses: list, stack: int, steps_per_s: float | None,
               on_measure: Callable[[Config, int], None] | None = None) -> SweepCost:
    """The cost of a sweep's dry run: sweep.SweepRun's configs, the progress
    its RunStatus rows report, at a given or measured steps/s."""
    done = {s.name: s.step or 0 for s in statuses}
    pending = [PendingRun(r.name, r.config, done.get(r.name, 0)) for r in sweep_runs]
    if steps_per_s is not None:
        return estimate(pending, stack, given_rate(steps_per_s), "given: --steps-per-s")
    try:
        return estimate(pending, stack, measured_rate(stack, on_measure=on_measure),
                        measured_source())
    except EiclError as e:  # the dry run still lists the runs
        return SweepCost([], 0.0, "", stack, unavailable=f"cannot measure steps/s here: {e}")
