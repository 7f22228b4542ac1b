"""Experiment trackers: TensorBoard and Weights & Biases views of a run's
metrics.jsonl, which stays the record.

A tracker takes exactly the records runs.append_metrics writes, as they are
written, and turns each into named scalars (`scalar_names`). The tracker
libraries are optional extras, imported only when a tracker is opened, so
this module's naming rules stay importable without them.

Layout in a run folder::

    RUN/tb/events.out.tfevents.*   TensorBoard event files (one per start)
    RUN/wandb_id                   the W&B run id, so a resume continues that run
    RUN/wandb/                     W&B's own files (offline runs among them)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from . import config as config_mod
from . import runs
from .errors import EiclError, first_line
from .sweep.manifest import is_sweep_dir, read_manifest
from .eval_modes import ICL_MODE, iwl_mode

TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id"
WANDB_DIR = "wandb"
INSTALL = {"tensorboard": "pip install 'eicl[tensorboard]'",
           "wandb": "pip install 'eicl[wandb]'"}
# Record fields that say where a record belongs rather than what it measured.
_LABELS = ("kind", "step", "mode")


class Tracker(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- naming

def scalar_names(record: dict, iwl: str | None = None) -> dict[str, float]:
    """Tracker name -> value of one metrics.jsonl record.

    Training records go under `train/` (train/loss, train/lr, train/steps_per_s,
    train/accuracy_query, train/from_support, ...). Evaluations of the ICL mode
    go under `icl/` and those of `iwl`, the run's headline IWL mode, under
    `iwl/`, so that icl/accuracy_query and icl/accuracy_closed sit side by side;
    every other mode under `eval/<mode>/`. Values JSON holds as null (non-finite
    ones) are left out."""
    if record.get("kind") == "train":
        prefix = "train"
    else:
        mode = str(record.get("mode"))
        prefix = "icl" if mode == ICL_MODE else "iwl" if mode == iwl else f"eval/{mode}"
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in _LABELS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def config_markdown(toml_text: str) -> str:
    """The resolved config as TensorBoard's text plugin shows it: as code."""
    return "\n".join("    " + line for line in toml_text.splitlines())


def missing_extra(name: str, e: ImportError) -> EiclError:
    return EiclError(f"the {name} tracker needs its extra ({first_line(e)}); install it "
                     f"with: {INSTALL[name]}")


# ---------------------------------------------------------------- TensorBoard

class TensorBoardTracker:
    """Event files in RUN/tb, written with the tensorboard package alone (no
    TensorFlow). A start that resumes from step S first writes a SessionLog
    START at S + 1: TensorBoard's readers then drop what an earlier start
    logged after S, as eicl drops those lines of metrics.jsonl."""

    def __init__(self, log_dir: Path, iwl: str | None, config_toml: str, start: int,
                 purge_from: int | None = None) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:
            raise missing_extra("tensorboard", e) from None
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._iwl = iwl
        self._writer = EventFileWriter(str(log_dir))
        if purge_from is not None:
            self._writer.add_event(event_pb2.Event(
                step=purge_from, session_log=event_pb2.SessionLog(
                    status=event_pb2.SessionLog.START)))
        self._text("config", config_markdown(config_toml), start)

    def _text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
        s = self._summary_pb2
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[text.encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        meta = s.SummaryMetadata(plugin_data=s.SummaryMetadata.PluginData(plugin_name="text"))
        self._add(s.Summary(value=[s.Summary.Value(tag=tag, metadata=meta, tensor=tensor)]),
                  step)

    def _add(self, summary: Any, step: int) -> None:
        self._writer.add_event(self._event_pb2.Event(summary=summary, step=step))

    def log(self, record: dict) -> None:
        s = self._summary_pb2
        values = [s.Summary.Value(tag=k, simple_value=v)
                  for k, v in scalar_names(record, self._iwl).items()]
        self._add(s.Summary(value=values), int(record["step"]))

    def close(self) -> None:
        self._writer.close()


def export_tensorboard(run_dir: Path, dest: Path) -> int:
    """Write a run's metrics.jsonl (trained with or without trackers) as
    TensorBoard event files in `dest`; returns the records written. An earlier
    export there is superseded (purged from step 0), not doubled."""
    cfg = runs.read_config(run_dir)
    records = runs.read_metrics(run_dir)
    runs.make_dir(dest, "TensorBoard folder")
    tracker = TensorBoardTracker(dest, iwl_mode(cfg.eval.modes), config_mod.to_toml(cfg), 0,
                                 purge_from=0)
    try:
        for record in records:
            tracker.log(record)
    finally:
        tracker.close()
    return len(records)


def export_paths(paths: Iterable[Path], out_dir: Path) -> list[tuple[Path, Path, int]]:
    """Export run folders to out_dir/<run> and sweep folders' runs to
    out_dir/<sweep>/<run>: (run folder, its TensorBoard folder, records)."""
    out = []
    for p in map(Path, paths):
        if runs.is_run_dir(p):
            pairs = [(p, Path(out_dir) / p.resolve().name)]
        elif is_sweep_dir(p):
            pairs = [(d, Path(out_dir) / p.resolve().name / d.name)
                     for d in sorted(p.iterdir()) if runs.is_run_dir(d)]
        else:
            raise EiclError(f"{p} is neither a run folder nor a sweep folder; "
                            "--tensorboard exports run folders")
        out.extend((run, dest, export_tensorboard(run, dest)) for run, dest in pairs)
    return out


# ---------------------------------------------------------------- W&B

def _new_run_id() -> str:
    """Eight lowercase letters and digits, as W&B makes its own run ids."""
    import secrets
    import string
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _init_timeout() -> float:
    """Seconds W&B may take to start a run before training goes on without
    it: WANDB_INIT_TIMEOUT where set, else 30 (W&B's own default is 90, a
    long wait at every start of every run of a sweep when the service is
    unreachable)."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", "30"))
    except ValueError:
        return 30.0


class WandbTracker:
    """One W&B run per run folder. Its id is kept in RUN/wandb_id, so that a
    resume continues it. The service being unreachable, or any other W&B
    failure, costs a warning and the tracker, never the training."""

    def __init__(self, cfg: config_mod.Config, run_dir: Path, resume_step: int,
                 group: str | None, name: str, warn: Callable[[str], None]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise missing_extra("wandb", e) from None
        self._warn, self._run, self._iwl = warn, None, iwl_mode(cfg.eval.modes)
        self._resume_step = resume_step
        id_file = Path(run_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else _new_run_id()
        if not id_file.is_file():
            runs.atomic_write_bytes(id_file, (run_id + "\n").encode())
        r = cfg.run
        try:
            self._run = wandb.init(
                project=r.wandb_project or os.environ.get("WANDB_PROJECT") or "eicl",
                entity=r.wandb_entity or None, id=run_id, resume="allow", group=group,
                name=name, dir=str(run_dir), config=config_mod.to_dict(cfg),
                reinit="create_new",
                settings=wandb.Settings(init_timeout=_init_timeout(), console="off",
                                        silent=True))
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave training alone
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self._warn(f"Weights & Biases failed ({first_line(e)}); training goes on without it "
                   "(metrics.jsonl keeps everything; set WANDB_MODE=offline to log locally)")
        self._run = None

    def log(self, record: dict) -> None:
        if self._run is None:
            return
        try:
            self._run.log(scalar_names(record, self._iwl), step=int(record["step"]))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail(e)


# ---------------------------------------------------------------- opening

def sweep_labels(run_dir: Path) -> tuple[str | None, str]:
    """(group, name) of a run: a sweep's run has its sweep file's name as the
    group and its sweep point (the run folder's name) as the name."""
    run_dir = Path(run_dir)
    group = None
    if is_sweep_dir(run_dir.parent):
        try:
            group = Path(read_manifest(run_dir.parent)["sweep_file"]).stem
        except (EiclError, KeyError, TypeError):
            group = run_dir.parent.name
    return group, run_dir.name


def open_trackers(cfg: config_mod.Config, run_dir: Path, resume_step: int,
                  group: str | None = None, name: str | None = None,
                  warn: Callable[[str], None] | None = None) -> list[Tracker]:
    """The trackers run.trackers names, opened for a start of `run_dir` at
    `resume_step` (0 for a new run). A missing extra is an EiclError."""
    if warn is None:
        from .display import warn
    if name is None:
        group, name = sweep_labels(run_dir)
    out: list[Tracker] = []
    try:
        for kind in dict.fromkeys(cfg.run.trackers):
            if kind == "tensorboard":
                out.append(TensorBoardTracker(
                    Path(run_dir) / TB_DIR, iwl_mode(cfg.eval.modes), config_mod.to_toml(cfg),
                    resume_step, purge_from=resume_step + 1 if resume_step else None))
            elif kind == "wandb":
                out.append(WandbTracker(cfg, run_dir, resume_step, group, name, warn))
    except BaseException:
        close_all(out)
        raise
    return out


def check_installed(cfgs: Iterable[config_mod.Config]) -> None:
    """Refuse, before any training, a tracker whose extra is not installed."""
    import importlib.util
    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for kind in dict.fromkeys(k for cfg in cfgs for k in cfg.run.trackers):
        if importlib.util.find_spec(modules[kind]) is None:
            raise EiclError(f"run.trackers has {kind!r} but the {modules[kind]} package is not "
                            f"installed; install it with: {INSTALL[kind]}")


def close_all(trackers: Iterable[Tracker]) -> None:
    for t in trackers:
        t.close()
