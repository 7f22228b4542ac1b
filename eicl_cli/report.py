"""IWL vs ICL per run and per sweep point: final and best values with their steps.

ICL is accuracy on `fewshot_holdout` (docs/experiment.md §8): `accuracy_query` (strict: the
model must emit the context's label among all outputs) and `accuracy_closed`
(argmax over the `ways` few-shot labels only; chance 1/ways). IWL is
accuracy on the run's no_support mode (`no_support_zipfian`, else
`no_support_common`, else `no_support_rare`, whichever its config evaluates).
A sweep folder gives one row per point: mean and standard deviation over its
seeds; runs of other folders that differ from a row only in seed join it
(seeds added later, in another sweep or run). Rows are marked when their data
is synthetic or when their eval modes differ from the other rows'.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import runs, sweep
from .eval_modes import ICL_MODE, iwl_mode, mode_ceiling
from .experiment_keys import SAME_EXPERIMENT_KEYS, experiment_identity, flat
from .errors import EiclError

METRICS = ("accuracy_query", "accuracy_closed")
# The share of a run's logged training steps that its training loss is
# averaged over when points are compared by it: one record is one log
# interval's mean, noisy enough to reorder points that train equally well.
TRAIN_LOSS_TAIL = 0.1


@dataclass
class Curve:
    steps: list[int]
    values: list[float]

    def final(self) -> tuple[float, int] | None:
        return (self.values[-1], self.steps[-1]) if self.steps else None

    def best(self) -> tuple[float, int] | None:
        if not self.steps:
            return None
        i = max(range(len(self.values)), key=lambda j: self.values[j])  # first of ties
        return self.values[i], self.steps[i]

    def tail(self, fraction: float = TRAIN_LOSS_TAIL) -> tuple[float, int] | None:
        """The mean over the steps from (1 - fraction) x the last step on, with the last step."""
        if not self.steps:
            return None
        last = self.steps[-1]
        return (statistics.fmean(v for s, v in zip(self.steps, self.values)
                                 if s >= (1 - fraction) * last), last)


@dataclass
class RunResult:
    path: Path
    name: str
    config: config_mod.Config
    iwl_mode: str | None
    checkpoint_step: int | None
    last_step: int | None
    curves: dict[tuple[str, str], Curve]   # (ICL|IWL, metric) or ("train", "loss") -> curve

    @property
    def synthetic(self) -> bool:
        return self.config.data.dataset == "synthetic"

    @property
    def eval_modes(self) -> tuple[str, ...]:
        return tuple(sorted(self.config.eval.modes))

    @property
    def finished(self) -> bool:
        """Trained to run.steps: by its checkpoint, or by its metrics where the
        checkpoints were left behind (results copied without them)."""
        return max(self.checkpoint_step or 0, self.last_step or 0) >= self.config.run.steps


def _curve(records: list[dict], metric: str) -> Curve:
    by_step: dict[int, float] = {}
    for r in records:  # a resumed run may repeat a step: the later record wins
        v = r.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return Curve(steps, [by_step[s] for s in steps])


def load_run(path: Path) -> RunResult:
    """A run folder, or a run's copy: NAME.metrics.jsonl beside NAME.config.toml."""
    path = Path(path)
    copy = copy_config(path)
    if copy is not None:
        cfg = runs.read_config_file(copy)
        name, progress = path.name.removesuffix(COPY_METRICS), None
    else:
        cfg, name, progress = runs.read_config(path), path.name, sweep.run_progress(path)
    mode = iwl_mode(cfg.eval.modes)
    records = runs.read_metrics(path)
    evals = [r for r in records if r.get("kind") == "eval"]
    curves = {("train", "loss"): _curve([r for r in records if r.get("kind") == "train"], "loss")}
    for which, m in (("ICL", ICL_MODE), ("IWL", mode)):
        recs = [r for r in evals if m and r.get("mode") == m]
        for metric in (*METRICS, "loss_query"):
            curves[(which, metric)] = _curve(recs, metric)
    all_steps = [r.get("step") for r in records if isinstance(r.get("step"), int)]
    return RunResult(path=path, name=name, config=cfg, iwl_mode=mode, checkpoint_step=progress,
                     last_step=max(all_steps) if all_steps else None, curves=curves)


# A run's results kept without its checkpoints (docs/results): its metrics and
# config side by side as NAME.metrics.jsonl and NAME.config.toml.
COPY_METRICS, COPY_CONFIG = ".metrics.jsonl", ".config.toml"


def copy_config(path: Path) -> Path | None:
    """The config beside a run's copied metrics file, or None if `path` is not one."""
    if not (path.is_file() and path.name.endswith(COPY_METRICS)):
        return None
    config = path.with_name(path.name.removesuffix(COPY_METRICS) + COPY_CONFIG)
    return config if config.is_file() else None


def _copies_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*" + COPY_METRICS) if copy_config(p) is not None)


def icl_ceiling(cfg: config_mod.Config) -> float | None:
    """Best expected fewshot_holdout accuracy of a perfect learner (docs/experiment.md §8)."""
    return mode_ceiling(cfg, ICL_MODE)


# ---------------------------------------------------------------- rows

@dataclass
class Stat:
    mean: float
    std: float | None          # None with one run
    steps: list[int]           # one per run that has the value

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "steps": self.steps}


def _stat(pairs: list[tuple[float, int]]) -> Stat | None:
    if not pairs:
        return None
    vals = [v for v, _ in pairs]
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Stat(statistics.fmean(vals), std, [s for _, s in pairs])


@dataclass
class Row:
    source: str                       # the sweep folder's name, or "" for single runs
    label: str                        # point name or run name
    values: dict[str, Any]            # swept key -> value
    runs: list[RunResult]
    expected_runs: int                # seeds in the manifest (1 for a run)
    notes: list[str] = field(default_factory=list)
    damaged: int = 0                  # runs left out: their files cannot be read

    def stat(self, which: str, metric: str, kind: str) -> Stat | None:
        """Mean and std over runs of each run's `kind` value: final, best or tail (Curve)."""
        pairs = []
        for r in self.runs:
            c = r.curves[(which, metric)]
            got = c.final() if kind == "final" else c.best() if kind == "best" else c.tail()
            if got:
                pairs.append(got)
        return _stat(pairs)

    def curve(self, which: str, metric: str) -> tuple[list[int], list[float], list[float | None]]:
        """Mean over runs at every evaluated step, and the std where >= 2 runs have it."""
        per_step: dict[int, list[float]] = {}
        for r in self.runs:
            c = r.curves[(which, metric)]
            for s, v in zip(c.steps, c.values):
                per_step.setdefault(s, []).append(v)
        steps = sorted(per_step)
        means = [statistics.fmean(per_step[s]) for s in steps]
        stds = [statistics.stdev(per_step[s]) if len(per_step[s]) > 1 else None for s in steps]
        return steps, means, stds

    @property
    def synthetic(self) -> bool:
        return any(r.synthetic for r in self.runs)

    @property
    def iwl_mode(self) -> str | None:
        modes = {r.iwl_mode for r in self.runs}
        return modes.pop() if len(modes) == 1 else None

    @property
    def ceiling(self) -> float | None:
        ceils = {round(icl_ceiling(r.config) or 0.0, 6) for r in self.runs}
        return ceils.pop() if len(ceils) == 1 else None

    @property
    def finished_runs(self) -> int:
        return sum(r.finished for r in self.runs)


def _experiment(row: Row) -> str | None:
    """What a row's runs compute, seed and bookkeeping keys left out."""
    if not row.runs:
        return None
    return experiment_identity(row.runs[0].config)


def _pool(rows: list[Row]) -> list[Row]:
    """Merge rows whose runs are one experiment at other seeds (a sweep's
    seed 0 and a later sweep or run of seed 1, say) into the first such row:
    the mean and std are then over every seed given. Runs of one experiment at
    the same seed stay apart: those are repeats being compared (two devices,
    two compiled steps), not more samples."""
    out: list[tuple[str | None, Row]] = []  # each kept row with its experiment
    for row in rows:
        key = _experiment(row)
        seeds = {r.config.run.seed for r in row.runs}
        into = next((o for k, o in out if key is not None and k == key
                     and not seeds & {r.config.run.seed for r in o.runs}), None)
        if into is None:
            out.append((key, row))
            continue
        into.runs = into.runs + row.runs
        into.expected_runs += row.expected_runs
        sources = [x for x in into.source.split(" + ") + [row.source] if x]
        into.source = " + ".join(dict.fromkeys(sources))
        into.values = {**row.values, **into.values}
    return [row for _, row in out]


def collect(paths: list[Path], pool: bool = True,
            warn: Callable[[str], None] | None = None) -> tuple[list[Row], list[str]]:
    """Rows for every run folder and sweep folder given; returns (rows, swept keys).
    With `pool`, runs that differ only in seed share one row, across folders.
    A run whose files are damaged (its config cut short, a metrics line
    that is not a record) is left out with `warn`, its sweep point marked,
    rather than shown as a run that has not started; when no run is left, the
    first such error is raised."""
    if not paths:
        raise EiclError("give at least one run folder or sweep folder")
    skipped: list[tuple[Path, EiclError]] = []

    def load(path: Path) -> RunResult | None:
        try:
            return load_run(path)
        except EiclError as e:
            skipped.append((path, e))
            return None

    rows: list[Row] = []
    keys: list[str] = []
    singles: list[RunResult] = []
    sweeps_seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise EiclError(f"{p} does not exist; give a run folder or a sweep folder")
        if sweep.is_sweep_dir(p):
            if p.resolve() in sweeps_seen:
                continue
            sweeps_seen.add(p.resolve())
            manifest = sweep.read_manifest(p)
            for k in manifest["swept_keys"]:
                if k not in keys:
                    keys.append(k)
            points: dict[str, list[dict]] = {}
            for r in manifest["runs"]:
                points.setdefault(r["point"], []).append(r)
            for point, members in points.items():
                loaded = [load(p / m["run_dir"]) for m in members
                          if runs.is_run_dir(p / m["run_dir"])]
                results = [r for r in loaded if r is not None]
                rows.append(Row(source=p.name, label=point, values=dict(members[0]["values"]),
                                runs=results, expected_runs=len(members),
                                damaged=len(loaded) - len(results)))
        elif runs.is_run_dir(p) or copy_config(p) is not None:
            singles.append(load(p))
        elif p.is_dir() and _copies_in(p):
            singles.extend(load(c) for c in _copies_in(p))
        else:
            raise EiclError(f"{p} is not a run folder (no {runs.CONFIG_FILE}), a sweep folder "
                            f"(no {sweep.MANIFEST}) nor a run's copy (NAME{COPY_METRICS} beside "
                            f"NAME{COPY_CONFIG})")
    singles = [r for r in singles if r is not None]
    if skipped and (warn is None or not singles and not any(row.runs for row in rows)):
        raise skipped[0][1]
    for path, e in skipped:
        warn(f"left out {path}: {e}")
    in_points = {k for row in rows for k in row.values}  # a sweep's grid and zip keys
    # A run given twice (alone, or inside a sweep also given) counts once.
    seen = {r.path.resolve() for row in rows for r in row.runs}
    for r in singles:
        if r.path.resolve() not in seen:
            seen.add(r.path.resolve())
            rows.append(Row(source="", label=r.name, values={}, runs=[r], expected_runs=1))
    if pool:
        rows = _pool(rows)
    # A column for every config key that differs between lone runs, and for
    # every other key that differs between rows but no sweep point names: a
    # sweep shown beside the runs it is compared with must show what sets
    # them apart (say a key its [set] table holds for all its points), while
    # the keys a zip sweep ties to its labels stay behind those labels.
    flat_of = [(row, flat(row.runs[0].config, used_only=True)) for row in rows if row.runs]
    flats = [f for _, f in flat_of]
    lone = [f for row, f in flat_of if not row.source]

    def differ(k: str, among: list[dict]) -> bool:
        return len({repr(f[k]) for f in among if k in f}) > 1

    for k in dict.fromkeys(k for f in flats for k in f):
        if k not in SAME_EXPERIMENT_KEYS and k not in keys and (
                differ(k, lone) or (k not in in_points and differ(k, flats))):
            keys.append(k)
    for row, values in flat_of:  # a column every row can fill: mixed sweeps and runs line up
        for k in keys:
            if k not in row.values and k in values:
                row.values[k] = values[k]
    _mark(rows)
    return rows, keys


def title(paths: list[Path], rows: list[Row] | None = None) -> str:
    """A heading for a table or plot: each sweep's description (else its file's
    name), and the run folders' names; given the rows, only the names of run
    folders that kept a row of their own (not those pooled into a sweep's)."""
    lone = None if rows is None else {r.runs[0].path.resolve() for r in rows
                                      if not r.source and r.runs}
    parts = []
    for p in paths:
        p = Path(p)
        if sweep.is_sweep_dir(p):
            m = sweep.read_manifest(p)
            parts.append(m.get("description") or Path(m.get("sweep_file", p.name)).stem)
        elif lone is None or p.resolve() in lone or any(q.parent == p.resolve() for q in lone):
            # (a folder of runs' copies: its rows are the copies themselves)
            parts.append(p.name.removesuffix(COPY_METRICS))
    text = "; ".join(dict.fromkeys(parts))
    return text if len(text) <= 100 else text[:97] + "..."


def _mark(rows: list[Row]) -> None:
    """Note synthetic data, and eval modes that differ from most rows'."""
    all_runs = [r for row in rows for r in row.runs]
    common = Counter(r.eval_modes for r in all_runs).most_common(1)
    usual = common[0][0] if common else ()
    for row in rows:
        if row.synthetic:
            row.notes.append("synthetic data")
        if any(r.eval_modes != usual for r in row.runs):
            modes = sorted({m for r in row.runs for m in r.eval_modes})
            row.notes.append("eval modes differ: " + ",".join(modes))
        if row.damaged:
            row.notes.append(f"{row.damaged} damaged, left out")
        if not row.runs:
            row.notes.append("not started")
        elif row.finished_runs < row.expected_runs:
            row.notes.append(f"{row.finished_runs}/{row.expected_runs} runs finished")


# ---------------------------------------------------------------- tuned points

@dataclass(frozen=True)
class Criterion:
    """A value sweep points are compared by (`--best-by`)."""
    name: str
    which: str      # whose curve: "train", "ICL" or "IWL"
    metric: str     # the curve's field in metrics.jsonl
    kind: str       # Row.stat's kind: "final", or "tail" (mean over the last steps)
    lower: bool     # lower is better
    text: str


BEST_BY = {c.name: c for c in (
    Criterion("train_loss", "train", "loss", "tail", True,
              f"each run's training loss averaged over its last {TRAIN_LOSS_TAIL:.0%} of "
              "logged steps"),
    Criterion("icl", "ICL", "accuracy_query", "final", False,
              f"final ICL strict accuracy: {ICL_MODE} accuracy_query"),
    Criterion("icl_closed", "ICL", "accuracy_closed", "final", False,
              f"final ICL closed accuracy: {ICL_MODE} accuracy_closed"),
    Criterion("iwl", "IWL", "accuracy_query", "final", False,
              "final IWL strict accuracy: accuracy_query on the run's no_support mode"),
    Criterion("icl_loss", "ICL", "loss_query", "final", True,
              f"final {ICL_MODE} loss_query"),
    Criterion("iwl_loss", "IWL", "loss_query", "final", True,
              "final loss_query on the run's no_support mode"),
)}


def criterion(name: str) -> Criterion:
    """The `--best-by` criterion called `name`; a one-line error for any other name."""
    if name not in BEST_BY:
        raise EiclError(f"--best-by {name!r} is not allowed; choose one of: {', '.join(BEST_BY)}")
    return BEST_BY[name]


def check_per(key: str) -> None:
    """Refuse a `--per` key that is not a config key, or one a row pools its runs over."""
    sweep.check_key("--per", key)
    if key in SAME_EXPERIMENT_KEYS:
        raise EiclError(f"--per {key}: one row pools runs that differ in {key} (a seed, where a "
                        "run writes or how its step is compiled); give a key that changes the "
                        "experiment, e.g. model.kind")


@dataclass
class Choice:
    """The row a group keeps."""
    group: Any          # its value of the --per key (None: no --per, or a model without the key)
    row: Row
    value: Stat         # the row's criterion value, over its runs
    candidates: int     # the group's rows that have a value
    points: int         # the group's rows
    unfinished: int     # the candidates' runs not trained to run.steps, unstarted ones included


@dataclass
class Best:
    """What `choose_best` kept, and how."""
    criterion: Criterion
    per: str | None
    choices: list[Choice]
    without_value: list[Any]    # groups none of whose rows has a value
    keys: list[str]             # the report's keys, `per` first

    @property
    def rows(self) -> list[Row]:
        return [c.row for c in self.choices]

    def heading(self) -> str:
        return f"best by {self.criterion.name}" + (f" per {self.per}" if self.per else "")

    def note(self) -> str:
        """The table's line saying how each group chose, and among how many points."""
        c = self.criterion

        def among(ch: Choice) -> str:
            of = f" of {ch.points}" if ch.candidates < ch.points else ""
            return f"among {ch.candidates}{of} point{'s' if ch.points > 1 else ''}"

        text = (f"One row per {self.per}: the point with the "
                if self.per else "The point with the ")
        text += f"{'lowest' if c.lower else 'highest'} {c.name} ({c.text}; mean over seeds)"
        if self.per:
            text += ": " + "; ".join(f"{_group_text(ch.group)} {among(ch)}"
                                     for ch in self.choices)
        else:
            text += ", chosen " + among(self.choices[0])
        if any(ch.candidates < ch.points for ch in self.choices):
            text += " (the others have no value yet)"
        unfinished = sum(ch.unfinished for ch in self.choices)
        if unfinished:
            text += (f"; {unfinished} of the candidates' runs unfinished, compared at their "
                     "last logged step")
        if self.without_value:
            text += "; no point has a value in " + ", ".join(
                f"{self.per} = {_group_text(g)}" for g in self.without_value)
        return text + "."

    def to_dict(self) -> dict:
        return {"metric": self.criterion.name, "lower_is_better": self.criterion.lower,
                "rule": self.criterion.text, "per": self.per,
                "groups_without_value": self.without_value}


def _group_text(value: Any) -> str:
    return "-" if value is None else sweep.format_value(value)


def _group_of(row: Row, key: str) -> Any:
    if row.runs:
        return flat(row.runs[0].config, used_only=True).get(key)
    return row.values.get(key)


def choose_best(rows: list[Row], keys: list[str], name: str, per: str | None = None,
                warn: Callable[[str], None] | None = None) -> Best:
    """Per value of the config key `per` (all rows as one group without it),
    the row best by BEST_BY[name], ties to the first row. A row without a
    value (no records yet, or a non-finite one: a run that diverged) cannot
    be chosen; a row whose runs are unfinished can, at their last logged
    step. A `per` key every row shares makes one group, with `warn`."""
    crit = criterion(name)
    if per is not None:
        check_per(per)
    groups: dict[str, tuple[Any, list[Row]]] = {}
    for row in rows:
        g = _group_of(row, per) if per else None
        groups.setdefault(repr(g), (g, []))[1].append(row)  # repr: a list value is no dict key
    if per and len(groups) == 1 and warn is not None:
        only = next(iter(groups.values()))[0]
        warn(f"--per {per}: every point has {per} = {_group_text(only)}; one group")
    choices, without = [], []
    for g, members in groups.values():
        valued = [(r, st) for r in members
                  if (st := r.stat(crit.which, crit.metric, crit.kind)) is not None
                  and math.isfinite(st.mean)]
        if not valued:
            without.append(g)
            continue
        row, value = (min if crit.lower else max)(valued, key=lambda rv: rv[1].mean)
        if per and g is not None:
            row.values[per] = g
        choices.append(Choice(group=g, row=row, value=value, candidates=len(valued),
                              points=len(members),
                              unfinished=sum(r.expected_runs - r.finished_runs
                                             for r, _ in valued)))
    if not choices:
        raise EiclError(f"--best-by {name}: no point has a value yet ({crit.text})")
    shown = ([per] if per else []) + [k for k in keys if k != per]
    return Best(criterion=crit, per=per, choices=choices, without_value=without, keys=shown)


# ---------------------------------------------------------------- outputs

def _steps_text(steps: list[int]) -> str:
    if not steps:
        return ""
    lo, hi = min(steps), max(steps)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _stat_text(st: Stat | None, with_step: bool = True) -> str:
    if st is None:
        return "-"
    text = f"{st.mean:.3f}"
    if st.std is not None:
        text += f" ±{st.std:.3f}"
    if with_step:
        text += f" @{_steps_text(st.steps)}"
    return text


def table(rows: list[Row], keys: list[str], metric: str = "accuracy_query",
          best: Best | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """(column headers, cells, footnotes) of the report table; with `best`,
    of its chosen rows, each with its criterion value after the keys."""
    other = "accuracy_closed" if metric == "accuracy_query" else "accuracy_query"
    tag = {"accuracy_query": "strict", "accuracy_closed": "closed"}
    show_source = len({r.source for r in rows}) > 1
    # Lone runs need a name column, unless a zip sweep's label column can hold it.
    show_label = (not keys or any(not r.source for r in rows)) and "label" not in keys
    iwl_modes = {r.iwl_mode for r in rows if r.runs}
    # A note every row shares goes under the table instead of in each row.
    shared = set.intersection(*(set(r.notes) for r in rows)) if rows else set()
    shared = {n for n in shared if n == "synthetic data"}
    notes_of = {id(r): [n for n in r.notes if n not in shared] for r in rows}
    headers = (["sweep"] if show_source else []) + (["run"] if show_label else [])
    shorts = sweep.short_names(keys)
    headers += [shorts[k] for k in keys]
    headers += ["n", "step", "ICL final", "ICL best", f"ICL {tag[other]}", "IWL final",
                "IWL best"]
    if len(iwl_modes) > 1:
        headers.append("IWL mode")
    show_notes = any(notes_of.values())
    if show_notes:
        headers.append("notes")
    cells = []
    for r in rows:
        line = ([r.source] if show_source else []) + ([r.label] if show_label else [])
        line += [sweep.format_value(r.values[k]) if k in r.values
                 else r.label if k == "label" and not r.source else "" for k in keys]
        last = [x.last_step for x in r.runs if x.last_step is not None]
        step = _steps_text(last) if last else "-"
        line += [f"{len(r.runs)}/{r.expected_runs}" if r.expected_runs > 1 else str(len(r.runs)),
                 f"{step}/{r.runs[0].config.run.steps}" if r.runs else "-",
                 _stat_text(r.stat("ICL", metric, "final"), with_step=False),
                 _stat_text(r.stat("ICL", metric, "best")),
                 _stat_text(r.stat("ICL", other, "final"), with_step=False),
                 _stat_text(r.stat("IWL", metric, "final"), with_step=False),
                 _stat_text(r.stat("IWL", metric, "best"))]
        if len(iwl_modes) > 1:
            line.append(r.iwl_mode or "-")
        if show_notes:
            line.append("; ".join(notes_of[id(r)]))
        cells.append(line)
    iwl = (next(iter(iwl_modes)) if len(iwl_modes) == 1 and None not in iwl_modes
           else "the no_support mode of each run (IWL mode)")
    notes = [f"ICL = fewshot_holdout, IWL = {iwl}; final and best accuracy, "
             f"{metric} ({tag[metric]}: "
             + ("argmax over all labels" if metric == "accuracy_query" else
                "argmax over the labels that can be right; few-shot chance 1/ways")
             + f"); ICL {tag[other]} = final {other}. Mean ±std over seeds; "
             "@ the step(s) of the best value; step = last logged step / run.steps."]
    ceilings = {r.ceiling for r in rows if r.runs}
    if len(ceilings) == 1 and None not in ceilings:
        notes.append(f"A perfect in-context learner scores about {next(iter(ceilings)):.3f} "
                     "on fewshot_holdout (few-shot classes are drawn with replacement).")
    elif ceilings:
        notes.append("fewshot_holdout ceilings: " + ", ".join(
            f"{r.label} {r.ceiling:.3f}" for r in rows if r.runs and r.ceiling is not None) + ".")
    if shared:
        notes.append("All runs use synthetic data: demos, not paper numbers.")
    elif any(r.synthetic for r in rows):
        notes.append("Rows marked synthetic data are demos, not paper numbers.")
    if best is not None:
        at = headers.index("n")
        headers.insert(at, best.criterion.name)
        for line, choice in zip(cells, best.choices):
            line.insert(at, _stat_text(choice.value, with_step=False))
        notes.insert(0, best.note())
    return headers, cells, notes


def _stat_json(st: Stat | None) -> dict | None:
    return st.to_dict() if st else None


def _choice_json(choice: Choice) -> dict:
    return {"group": choice.group, "value": choice.value.to_dict(),
            "candidates": choice.candidates, "points": choice.points,
            "unfinished_runs": choice.unfinished}


def to_json(rows: list[Row], keys: list[str], best: Best | None = None) -> str:
    """The report as JSON; with `best`, of its chosen rows, each with its `choice`."""
    out = []
    for i, r in enumerate(rows):
        entry: dict[str, Any] = {
            "source": r.source, "label": r.label, "values": r.values,
            "runs": [str(x.path) for x in r.runs], "expected_runs": r.expected_runs,
            "finished_runs": r.finished_runs,
            "last_step": [x.last_step for x in r.runs],
            "steps": r.runs[0].config.run.steps if r.runs else None,
            "dataset": sorted({x.config.data.dataset for x in r.runs}),
            "synthetic": r.synthetic,
            "eval_modes": sorted({m for x in r.runs for m in x.eval_modes}),
            "iwl_mode": r.iwl_mode, "icl_mode": ICL_MODE,
            "icl_ceiling": r.ceiling, "notes": r.notes,
        }
        for which in ("ICL", "IWL"):
            for metric in METRICS:
                entry[f"{which.lower()}_{metric}"] = {
                    "final": _stat_json(r.stat(which, metric, "final")),
                    "best": _stat_json(r.stat(which, metric, "best"))}
        if best is not None:
            entry["choice"] = _choice_json(best.choices[i])
        out.append(entry)
    doc: dict[str, Any] = {"swept_keys": keys}
    if best is not None:
        doc["best_by"] = best.to_dict()
    return json.dumps({**doc, "rows": out}, indent=1)


def to_csv(rows: list[Row], keys: list[str], best: Best | None = None) -> str:
    """The report as CSV; with `best`, of its chosen rows, each with its
    criterion value, candidates and points after the keys."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = []
    for which in ("icl", "iwl"):
        for metric in METRICS:
            for kind in ("final", "best"):
                cols += [f"{which}_{metric}_{kind}_{x}" for x in ("mean", "std", "step")]
    chosen = ["best_by", "best_by_mean", "best_by_std", "candidates", "points",
              "unfinished_runs"] if best is not None else []
    w.writerow(["source", "label", *keys, *chosen, "n_runs", "expected_runs", "finished_runs",
                "last_step", "steps", "synthetic", "iwl_mode", "icl_ceiling", *cols, "notes"])
    for i, r in enumerate(rows):
        choice = []
        if best is not None:
            c = best.choices[i]
            choice = [best.criterion.name, c.value.mean, "" if c.value.std is None else c.value.std,
                      c.candidates, c.points, c.unfinished]
        vals = []
        for which in ("ICL", "IWL"):
            for metric in METRICS:
                for kind in ("final", "best"):
                    st = r.stat(which, metric, kind)
                    vals += ([st.mean, "" if st.std is None else st.std, _steps_text(st.steps)]
                             if st else ["", "", ""])
        last = [x.last_step for x in r.runs if x.last_step is not None]
        w.writerow([r.source, r.label,
                    *[sweep.format_value(r.values[k]) if k in r.values else "" for k in keys],
                    *choice, len(r.runs), r.expected_runs, r.finished_runs,
                    _steps_text(last), r.runs[0].config.run.steps if r.runs else "",
                    str(r.synthetic).lower(), r.iwl_mode or "",
                    "" if r.ceiling is None else round(r.ceiling, 6), *vals, "; ".join(r.notes)])
    return buf.getvalue()
