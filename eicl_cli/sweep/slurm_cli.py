"""`eicl sweep FILE --launcher slurm` / `--status` / `--cancel`: the steps
between the parsed command line (cli.py) and the Slurm launcher (slurm.py),
with what they print (display.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import cost, display
from ..errors import EiclError
from . import slurm, slurm_settings
from .manifest import dry_run_statuses, is_sweep_dir, read_manifest, write_manifest
from .spec import SweepRun, SweepSpec, swept_keys


def run(spec: SweepSpec, sweep_runs: list[SweepRun], folder: Path, overrides: list[str], *,
        stack: int, dry_run: bool, status: bool, cancel: bool, json_out: bool,
        steps_per_s: float | None) -> None:
    if sum((dry_run, status, cancel)) > 1:
        raise EiclError("give one of --dry-run, --status and --cancel")
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    if steps_per_s is not None and not dry_run:
        raise EiclError("--steps-per-s only applies to --dry-run")
    settings = slurm_settings.merged(spec.slurm, slurm_settings.parse_overrides(overrides))
    keys = swept_keys(spec)
    if status or cancel:
        if not is_sweep_dir(folder):
            raise EiclError(f"{folder} holds no sweep yet: submit it with "
                            f"`eicl sweep {spec.path} --launcher slurm`")
        if cancel:
            ids = slurm.cancel(folder)
            display.info(f"cancelled {len(ids)} task(s): {', '.join(ids)}; checkpoints kept"
                         if ids else "nothing queued or running to cancel")
            return
        rows = slurm.task_statuses(folder)
        if json_out:
            display.print_json(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        else:
            display.print_slurm_status(rows, keys, f"{spec.path.name}: {len(rows)} runs in {folder}")
        return
    if dry_run:
        statuses = dry_run_statuses(folder, spec, sweep_runs)
        tasks = slurm.plan(folder.resolve(), sweep_runs, statuses, stack)
        display.print_slurm_plan(tasks, slurm_settings.executor_parameters(settings),
                                 f"dry run: a job array of {len(tasks)} task(s) for "
                                 f"{spec.path.name} in {folder}")
        if steps_per_s is not None:
            cost.check_steps_per_s(steps_per_s)
        estimate = cost.sweep_cost(sweep_runs, statuses, stack, steps_per_s,
                                   on_measure=display.measuring)
        display.print_sweep_cost(estimate)
        if not estimate.unavailable:
            gpus = settings.get("gpus", 0)
            display.info(f"expected: {estimate.seconds / 3600:.3g} task-hours, "
                         f"{slurm.gpu_hours(estimate.seconds, settings):.3g} GPU-hours "
                         f"({gpus} GPU(s) per task)")
        return
    slurm.require_submitit()
    write_manifest(folder, spec, sweep_runs)
    result = slurm.submit(folder, read_manifest(folder), settings, stack=stack)
    if result.job_id is None:
        display.info(f"nothing to submit: {len(result.finished)} run(s) finished, "
                     f"{len(result.queued)} queued or running")
        return
    display.info(f"submitted job array {result.job_id}: {len(result.tasks)} task(s) "
                 f"({sum(len(t) for t in result.tasks)} run(s)); {len(result.finished)} finished "
                 f"and {len(result.queued)} queued left alone; "
                 f"`eicl sweep {spec.path} --out {folder} --status` to follow it")
