"""Training: the step (step.py, flat_step.py), the runs it advances
(trainer.py: one run or K stacked), the one loop (loop.py) and the checks
made before a run folder exists (preflight.py)."""

from .loop import Outcome, TrainingDiverged, train_runs
from .preflight import (discard_if_unstarted, resolved_config, start_run, start_stack,
                        train_config)

__all__ = ["Outcome", "TrainingDiverged", "train_runs", "discard_if_unstarted",
           "resolved_config", "start_run", "start_stack", "train_config"]
