"""Sweeps: a grid of configs (a paper figure), each point a run folder.

spec.py reads and expands the sweep file, manifest.py keeps the sweep
folder's record and each run's status, local.py launches the runs as
processes on this machine (devices.py shares out its GPUs).
"""

from .local import (LOCK_FILE, LOG_DIR, SweepResult, continue_command, plan_stacked_tasks,
                    plan_tasks, run_sweep, stack_command, sweep_lock, train_command)
from .manifest import (MANIFEST, STATE_FILE, STATES, RunStatus, check_manifest,
                       dry_run_statuses, is_finished, is_sweep_dir, latest_eval,
                       manifest_dict, read_manifest, read_state, run_progress, run_state,
                       statuses, write_manifest, write_state)
from .spec import (SweepRun, SweepSpec, check_key, default_out, expand, format_value,
                   load_sweep, prepare, short_names, swept_keys)

__all__ = [
    "LOCK_FILE", "LOG_DIR", "SweepResult", "continue_command", "plan_stacked_tasks",
    "plan_tasks", "run_sweep", "stack_command", "sweep_lock", "train_command",
    "MANIFEST", "STATE_FILE", "STATES", "RunStatus", "check_manifest", "dry_run_statuses",
    "is_finished", "is_sweep_dir", "latest_eval", "manifest_dict", "read_manifest",
    "read_state", "run_progress", "run_state", "statuses", "write_manifest", "write_state",
    "SweepRun", "SweepSpec", "check_key", "default_out", "expand", "format_value",
    "load_sweep", "prepare", "short_names", "swept_keys",
]
