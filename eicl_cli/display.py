"""All Rich output of eicl."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

# Piped into a file or a log, Rich would lay tables out for 80 columns and
# wrap run names a few characters a line; there is no screen to fit, so
# such output gets 160 (COLUMNS, where set, still decides).
_PIPED_WIDTH = 160


def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, width=_PIPED_WIDTH)
    return c


# One console for stdout and one for stderr, shared by every printer below.
console = _console()
err_console = _console(stderr=True)


def use_current_environment() -> None:
    """Make the two consoles anew for the environment as it is now. Rich
    fixes a console's width when the console is made, and a command run
    inside another program (cli.run_app, tests) may find COLUMNS or its
    output stream changed since eicl was imported."""
    global console, err_console
    console, err_console = _console(), _console(stderr=True)


def is_terminal() -> bool:
    """True when stdout is an interactive terminal (live bars); else plain lines."""
    return sys.stdout.isatty()


# ---------------------------------------------------------------- train / eval (train.py, evaluate.py)

def warn(message: str) -> None:
    err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True, emoji=False)


def info(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True, emoji=False)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class TrainDisplay:
    """Live progress of a training run: a Rich bar on a terminal, plain lines elsewhere.

    Use as a context manager; `log` at every logging interval, `eval_table`
    at every evaluation, `print` for anything else (it keeps the bar intact)."""

    def __init__(self, total_steps: int, start_step: int, live: bool | None = None) -> None:
        self.total = total_steps
        self.start = start_step
        self.live = is_terminal() if live is None else live
        self._progress = None
        self._task = None
        self._legend_shown = False

    def __enter__(self) -> "TrainDisplay":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self._progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=20),
                TextColumn("{task.fields[sps]} steps/s"), TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("loss {task.fields[loss]}  train acc {task.fields[acc]}"),
                console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total,
                                                 completed=self.start, sps="-", loss="-",
                                                 acc="-")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def print(self, message: str) -> None:
        target = self._progress.console if self._progress is not None else console
        target.print(message, markup=False, highlight=False, soft_wrap=True, emoji=False)

    def log(self, step: int, loss: float, accuracy: float, steps_per_s: float, lr: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, sps=f"{steps_per_s:.1f}",
                                  loss=_fmt(loss, 4), acc=_fmt(accuracy))
            return
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else 0.0
        console.print(
            f"step {step}/{self.total}  loss {_fmt(loss, 4)}  train acc {_fmt(accuracy)}  "
            f"lr {lr:.3g}  {steps_per_s:.1f} steps/s  eta {_eta(eta)}",
            markup=False, highlight=False, soft_wrap=True, emoji=False)

    def eval_table(self, step: int, rows: list[dict], *, elapsed: float | None = None) -> None:
        """rows: evaluate.table_rows(...) — one dict per mode. elapsed: the run's
        wall time in seconds so far, before a resume included (the metrics' `time`)."""
        when = f" ({_elapsed(elapsed)} elapsed)" if elapsed is not None else ""
        if self._progress is not None:
            # The legend explains the columns once; repeated, it buries the numbers.
            self._progress.console.print(eval_table(rows, title=f"evaluation at step {step}{when}",
                                                    legend=not self._legend_shown))
            self._legend_shown = True
            return
        for r in rows:
            role = f" ({r['role']})" if r["role"] else ""
            ceiling = f"  ceiling {_fmt(r['ceiling'])}" if r["ceiling"] is not None else ""
            console.print(
                f"eval step {step}{when}  {r['mode']}{role}  accuracy_query {_fmt(r['accuracy_query'])}"
                f"  accuracy_closed {_fmt(r['accuracy_closed'])}  loss {_fmt(r['loss_query'], 4)}"
                f"{ceiling}  n {r['sequences']}",
                markup=False, highlight=False, soft_wrap=True, emoji=False)


def _elapsed(seconds: float) -> str:
    """Wall time as H:MM:SS, the hours unbounded (long runs last days)."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def eval_table(rows: list[dict], title: str, legend: bool = True):
    """A Rich table, one row per eval mode, with IWL and ICL named as such,
    and (with `legend`) what the roles and columns mean. Compact enough for an
    80-column terminal."""
    from rich import box
    from rich.table import Table
    n = {r["sequences"] for r in rows}
    if len(n) == 1:
        title += f", {n.pop()} sequences per mode"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("accuracy_query", justify="right")
    table.add_column("accuracy_closed", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("ceiling", justify="right")
    for r in rows:
        table.add_row(r["mode"], r["role"], _fmt(r["accuracy_query"]),
                      _fmt(r["accuracy_closed"]), _fmt(r["loss_query"], 3), _fmt(r["ceiling"]))
    if not legend:
        return table
    table.caption = ("IWL = in-weights learning, ICL = in-context learning. accuracy_query: "
                     "argmax over all labels (strict); accuracy_closed: argmax over the labels "
                     "that can be right (few-shot: 0..ways-1); ceiling: the best any learner can "
                     "score, as few-shot classes are drawn with replacement.")
    table.caption_justify = "left"
    return table


def sources_table(rows: list[dict]):
    """The from_* metrics of docs/experiment.md §8: where the query predictions come from."""
    from rich import box
    from rich.table import Table
    table = Table(title="where the query predictions come from (share of sequences)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("mode", no_wrap=True)
    names = [("from_common", "com"), ("from_rare", "rare"), ("from_fewshot", "fs"),
             ("from_support", "sup"), ("from_support_common", "sup&com"),
             ("from_support_rare", "sup&rare"), ("from_support_fewshot", "sup&fs")]
    for _, header in names:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(r["mode"], *(_fmt(r["metrics"][k]) for k, _ in names))
    table.caption = ("The from_* metrics: com / rare = a common / rare class's label, "
                     "fs = one of 0..ways-1, sup = a label shown in the sequence's context, "
                     "sup&X = both.")
    table.caption_justify = "left"
    return table


def print_eval_results(rows: list[dict], title: str, live: bool | None = None) -> None:
    """`eicl eval`'s output: two tables on a terminal, plain lines elsewhere."""
    if is_terminal() if live is None else live:
        console.print(eval_table(rows, title))
        console.print(sources_table(rows))
        return
    console.print(title, markup=False, highlight=False, soft_wrap=True, emoji=False)
    for r in rows:
        parts = [f"{k} {_fmt(v, 4)}" for k, v in r["metrics"].items()]
        role = f" ({r['role']})" if r["role"] else ""
        ceiling = f"  ceiling {_fmt(r['ceiling'], 4)}" if r["ceiling"] is not None else ""
        console.print(f"{r['mode']}{role}  " + "  ".join(parts) + ceiling
                      + f"  sequences {r['sequences']}",
                      markup=False, highlight=False, soft_wrap=True, emoji=False)


def print_train_outcome(status: str, step: int, steps: int, run_dir: Path,
                        checkpoints: Path) -> None:
    """How `eicl train` ended: finished, interrupted (and how to go on), or
    nothing to do."""
    if status == "interrupted":
        info(f"interrupted at step {step}; resume with: eicl train --resume {run_dir}")
    elif status == "already_done":
        info(f"{run_dir} is already at step {step} (run.steps = {steps}): nothing to do, the "
             f"run is unchanged; continue it with --set run.steps=N, N > {step}")
    else:
        info(f"finished {step} steps; checkpoints in {checkpoints}")


def print_json(text: str) -> None:
    """Machine-readable output, unstyled and unwrapped."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- sweep / report (sweep.py, report.py)

_STATE_STYLE = {"pending": "dim", "running": "bold yellow", "finished": "green",
                "failed": "bold red", "interrupted": "magenta"}


def sweep_table(statuses: list, keys: list[str], title: str):
    """A Rich table of a sweep's runs: swept values, seed, state, progress, latest ICL/IWL.

    statuses: sweep.RunStatus objects; keys: the swept keys in column order."""
    from rich.table import Table
    from rich.text import Text

    from .sweep.spec import format_value
    table = Table(title=title, title_justify="left")
    shorts = [k.split(".", 1)[-1] for k in keys]
    for k, s in zip(keys, shorts):
        table.add_column(s if shorts.count(s) == 1 else k, overflow="fold")
    table.add_column("seed", justify="right")
    table.add_column("state", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("ICL", justify="right")
    table.add_column("IWL", justify="right")
    counts: dict[str, int] = {}
    for st in statuses:
        counts[st.state] = counts.get(st.state, 0) + 1
        state = st.state if st.returncode in (None, 0) or st.state != "failed" else \
            f"failed (exit {st.returncode})"
        table.add_row(*[Text(format_value(st.values.get(k, ""))) for k in keys], str(st.seed),
                      Text(state, style=_STATE_STYLE.get(st.state, "")),
                      f"{st.step if st.step is not None else '-'}/{st.steps}",
                      _fmt(st.icl), _fmt(st.iwl))
    mode = {st.iwl_mode for st in statuses}
    table.caption = (", ".join(f"{n} {s}" for s, n in counts.items())
                     + ". ICL = fewshot_holdout accuracy_query, IWL = "
                     + (mode.pop() or "-" if len(mode) == 1 else "the run's no_support mode")
                     + " accuracy_query, at the latest evaluation.")
    table.caption_justify = "left"
    return table


def print_sweep_table(statuses: list, keys: list[str], title: str) -> None:
    console.print(sweep_table(statuses, keys, title))


def duration(seconds: float) -> str:
    """A training time at the precision a plan needs: 45s, 12m 05s, 3h 20m, 5d 04h."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def sweep_cost_table(cost):
    """cost: cost.SweepCost. Per run: steps left, the steps/s of the step it
    trains in, and the time of its task; then the sum."""
    from rich import box
    from rich.table import Table
    stacked = cost.stack > 1
    t = Table(title=f"expected training time ({cost.source})", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("run", no_wrap=True)
    t.add_column("steps left", justify="right")
    t.add_column("steps/s", justify="right")
    if stacked:
        t.add_column("stacked", justify="right")
    t.add_column("time", justify="right")
    for r in cost.runs:
        row = [r.name, f"{r.steps_left:,}",
               f"{r.steps_per_s:.3g}" if r.steps_per_s is not None else "-"]
        if stacked:
            row.append(f"{r.stacked_with}" if r.steps_left else "-")
        row.append(duration(r.seconds) if r.steps_left else "done")
        t.add_row(*row)
    shared = " (a stacked task's time is shown on each of its runs, counted once)" \
        if stacked else ""
    t.caption = f"in all, one task after another: {duration(cost.seconds)}{shared}"
    t.caption_justify = "left"
    return t


def measuring(cfg, stack: int) -> None:
    """Said before each steps/s measurement of a sweep's dry run (each compiles a step)."""
    what = f"{stack} stacked runs of " if stack > 1 else ""
    info(f"measuring steps/s of {what}{cfg.model.kind} ({cfg.embedding.example_encoder} "
         f"encoder, batch {cfg.train.batch_size}) after compiling it; "
         "--steps-per-s skips this")


def print_sweep_cost(cost) -> None:
    if cost.unavailable:
        info(f"no time estimate: {cost.unavailable}; give --steps-per-s")
        return
    console.print(sweep_cost_table(cost))


_SLURM_STYLE = {"pending": "dim", "submitted": "dim", "running": "bold yellow",
                "requeued": "magenta", "done": "green", "failed": "bold red",
                "timed out": "bold red", "cancelled": "red", "not submitted": "dim"}


def slurm_status_table(rows: list, keys: list[str], title: str):
    """`eicl sweep --status`: per run its array task, the cluster's state,
    progress, latest ICL/IWL, steps/s; a failed task's error and log below.

    rows: sweep.slurm.TaskStatus objects; keys: the swept keys."""
    from rich.table import Table
    from rich.text import Text

    from .sweep.spec import format_value
    table = Table(title=title, title_justify="left")
    shorts = [k.split(".", 1)[-1] for k in keys]
    for k, s in zip(keys, shorts):
        table.add_column(s if shorts.count(s) == 1 else k, overflow="fold")
    for name, justify in (("seed", "right"), ("job", "left"), ("state", "left"),
                          ("step", "right"), ("ICL", "right"), ("IWL", "right"),
                          ("steps/s", "right")):
        table.add_column(name, justify=justify, no_wrap=name in ("job", "state"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
        table.add_row(*[Text(format_value(r.values.get(k, ""))) for k in keys], str(r.seed),
                      r.job_id or "-", Text(r.state, style=_SLURM_STYLE.get(r.state, "")),
                      f"{r.step if r.step is not None else '-'}/{r.steps}",
                      _fmt(r.icl), _fmt(r.iwl),
                      f"{r.steps_per_s:.3g}" if r.steps_per_s is not None else "-")
    notes = [", ".join(f"{n} {s}" for s, n in counts.items()) + "."]
    for r in rows:
        if r.error:
            notes.append(f"{r.name}: {r.error} (log {r.log or r.slurm_log})")
    table.caption = Text("\n".join(notes))  # error lines are shown as they are, not as markup
    table.caption_justify = "left"
    return table


def print_slurm_status(rows: list, keys: list[str], title: str) -> None:
    console.print(slurm_status_table(rows, keys, title))


def print_slurm_plan(tasks: list, parameters: dict, title: str) -> None:
    """A Slurm dry run: the array's tasks, what each trains, and the sbatch
    settings (submitit's parameters) it would be submitted with."""
    from rich import box
    from rich.table import Table
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("task", justify="right")
    t.add_column("runs", overflow="fold")
    t.add_column("command", overflow="fold")
    for task in tasks:
        t.add_row(str(task.index), ", ".join(task.runs), " ".join(task.command))
    console.print(t)
    s = Table(title="sbatch settings (submitit parameters)", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    s.add_column("parameter", no_wrap=True)
    s.add_column("value", overflow="fold")
    for key, value in parameters.items():
        s.add_row(key, str(value))
    console.print(s)


class SweepDisplay:
    """Live sweep table on a terminal; on other outputs one line per event."""

    def __init__(self, keys: list[str], title: str, live: bool | None = None) -> None:
        self.keys, self.title = keys, title
        self.live = is_terminal() if live is None else live
        self._live = None

    def __enter__(self) -> "SweepDisplay":
        if self.live:
            from rich.live import Live
            self._live = Live(console=console, refresh_per_second=2, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, statuses: list, message: str) -> None:
        if self._live is not None:
            self._live.update(sweep_table(statuses, self.keys, self.title))
            if message:
                self._live.console.print(f"sweep: {message}", markup=False, highlight=False)
        elif message:
            console.print(f"sweep: {message}", markup=False, highlight=False, soft_wrap=True,
                          emoji=False)


def print_report_table(headers: list[str], cells: list[list[str]], notes: list[str],
                       title: str) -> None:
    """`eicl report`'s table: one row per run or sweep point."""
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for h in headers:
        numeric = h.startswith(("ICL", "IWL", "n", "step")) and h not in ("notes", "IWL mode")
        table.add_column(h, justify="right" if numeric else "left", overflow="fold",
                         no_wrap=h in ("n", "step"))
    from rich.text import Text
    for line in cells:
        table.add_row(*[Text(c) for c in line])  # names may hold [brackets]: never markup
    table.caption = " ".join(notes)
    table.caption_justify = "left"
    console.print(table)


# ---------------------------------------------------------------- sample (data/sequences.py)

def sample_tables(records: list[dict], mode: str) -> list:
    """One Rich table per sampled sequence (records from sequences.batch_records):
    position, dataset class, Omniglot id, alphabet, drawer, label, rare; query marked."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    tables = []
    for r in records:
        augmented = any(r["variants"])
        burst = "with a few-shot burst" if r["bursty"] else "no burst"
        table = Table(title=f"sequence {r['sequence']} · {mode} · {burst}", title_justify="left",
                      box=box.SIMPLE_HEAD, show_edge=False)
        for col in ("pos", "class", "omniglot") + (("variant",) if augmented else ()) + (
                "alphabet", "drawer", "label", "rare"):
            if col == "alphabet":  # long names give way first when the terminal is narrow
                table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=24)
            else:
                table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
        last = len(r["labels"]) - 1
        for p in range(len(r["labels"])):
            cells = [("query" if p == last else str(p)), str(r["classes"][p]),
                     str(r["omniglot_ids"][p])]
            if augmented:
                cells.append(str(r["variants"][p]))
            cells += [r["alphabets"][p], str(r["drawers"][p]), str(r["labels"][p]),
                      "yes" if r["is_rare"][p] else ""]
            table.add_row(*[Text(c) for c in cells], style="bold red" if p == last else None)
        tables.append(table)
    return tables


def print_sample(records: list[dict], mode: str) -> None:
    for table in sample_tables(records, mode):
        console.print(table)


# ---------------------------------------------------------------- prepare-data (prepare.py)

_PREPARE_LABELS = {"decode": "decoding images", "draw": "drawing glyphs", "convert": "converting TFDS"}


class PrepareProgress:
    """Bars for `eicl prepare-data`: one per task (a download, decoding).
    Call the instance as progress(task, done, total). Off a terminal it prints
    nothing until the summary."""

    def __init__(self, live: bool | None = None) -> None:
        from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn)
        self.live = is_terminal() if live is None else live
        self._tasks: dict[str, int] = {}
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TaskProgressColumn(), TimeElapsedColumn(), console=console,
                                  disable=not self.live, transient=False)

    def __enter__(self) -> "PrepareProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self._tasks:
            label = _PREPARE_LABELS.get(task, f"downloading {task}")
            self._tasks[task] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[task], completed=done, total=total)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_prepare_summary(result) -> None:
    """Summary table of a prepared (or already up-to-date) dataset cache."""
    from rich.table import Table
    if result.skipped:
        info(f"{result.path} is up to date (built from {result.source}); nothing to do. "
             "Use --force to rebuild.")
    if result.note:
        warn(result.note if result.skipped else f"rebuilt the cache: {result.note}")
    title = f"{result.kind} cache" + (" (SYNTHETIC glyphs, not Omniglot)" if result.synthetic else "")
    t = Table(title=title, show_header=True, header_style="bold")
    for col in ("alphabets", "classes", "bg / eval classes", "images", "size on disk", "seconds"):
        t.add_column(col, justify="right")
    t.add_row(f"{result.n_alphabets:,}", f"{result.n_classes:,}",
              f"{result.n_background_classes:,} / {result.n_evaluation_classes:,}",
              f"{result.n_images:,}", _size(result.bytes), f"{result.seconds:.1f}")
    console.print(t)
    info(f"cache: {result.path}")
    info(f"source: {result.source}")


# ---------------------------------------------------------------- model (model/, train --print-model)

def model_table(rows: list[tuple[str, int]], title: str):
    """Parameters per module; `rows` from model.parameter_counts, ending in ("total", n)."""
    from rich.table import Table

    total = rows[-1][1] if rows and rows[-1][0] == "total" else sum(n for _, n in rows)
    t = Table(title=title)
    t.add_column("module")
    t.add_column("parameters", justify="right")
    t.add_column("share", justify="right")
    for i, (name, n) in enumerate(rows):
        is_total = name == "total" and i == len(rows) - 1
        share = f"{100.0 * n / total:.1f}%" if total else "-"
        t.add_row(name, f"{n:,}", share, end_section=(i == len(rows) - 2 and rows[-1][0] == "total"),
                  style="bold" if is_total else None)
    return t


def print_model_table(rows: list[tuple[str, int]], title: str) -> None:
    console.print(model_table(rows, title))


# ---------------------------------------------------------------- bench (bench.py)

_BENCH_ROWS = (
    ("device", "device", "{}"),
    ("stack", "stacked runs", "{}"),
    ("generator_sequences_per_s", "generator sequences/s", "{:,.0f}"),
    ("draw_workers", "batch draw workers", "{}"),
    ("draw_sequences_per_s", "loop draws sequences/s", "{:,.0f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("train_steps_per_s", "train steps/s", "{:,.3f}"),
    ("train_sequences_per_s", "train sequences/s", "{:,.1f}"),
    ("step_ms", "ms per step", "{:,.1f}"),
    ("eval_sequences_per_s", "eval sequences/s", "{:,.1f}"),
    ("peak_host_rss_gb", "peak host RSS GB", "{:.2f}"),
    ("peak_device_gb", "peak device GB", "{:.2f}"),
)


def print_bench_table(results: list[dict]) -> None:
    """One column per benchmarked config (bench.bench_config results)."""
    from rich.table import Table

    t = Table(title="eicl bench")
    t.add_column("")
    for r in results:
        t.add_column(r["config"] + (f" x{r['stack']}" if r.get("stack", 1) > 1 else ""),
                     justify="right")
    for key, label, fmt in _BENCH_ROWS:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for r in results]
        t.add_row(label, *cells)
    console.print(t)
    info(f"train figures are steady state over {results[0]['train_steps']} steps after "
         "compilation; peak host RSS is the whole process so far")
    if results[0].get("set"):
        info("with --set " + " ".join(results[0]["set"]))
    if results[0].get("xla_flags"):
        info("with XLA_FLAGS=" + results[0]["xla_flags"])
    if results[0].get("glibc_tunables"):
        info("with GLIBC_TUNABLES=" + results[0]["glibc_tunables"])


# ---------------------------------------------------------------- probe (probe.py)

def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _probe_accuracies(modes: dict) -> list[tuple[str, str, str]]:
    """(mode, metric, column heading) of each accuracy the probe tables show:
    strict for every mode, closed too except for IWL (no_support_*), whose
    closed answer is not a measure of its own."""
    shown = []
    for mode, m in modes.items():
        short = m["role"] or mode
        shown.append((mode, "accuracy_query", f"{short} strict"))
        if m["role"] != "IWL":
            shown.append((mode, "accuracy_closed", f"{short} closed"))
    return shown


def probe_heads_table(result, rows: list[dict], top: int):
    """The heads that matter most at one checkpoint: their attention scores
    and what ablating each does to every mode's accuracies."""
    from rich import box
    from rich.table import Table
    modes = result.modes
    scored = rows[0]["scores_mode"] if rows else ""
    table = Table(title=f"step {result.step}: the {min(top, len(rows))} heads that matter most "
                  f"({result.layout} tokens, scores on {scored}, {result.ablation}-ablated)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for name in ("layer", "head"):
        table.add_column(name, justify="right")
    for header in ("label→match", "label→other", "image→match", "prev-token"):
        table.add_column(header, justify="right")
    shown = _probe_accuracies(modes)
    for _, _, heading in shown:
        table.add_column(f"Δ {heading}", justify="right")
    for row in rows[:top]:
        cells = [str(row["layer"]), str(row["head"])]
        cells += [_fmt(row[k]) for k in ("label_match", "label_other", "image_match",
                                          "previous_token")]
        cells += [_signed(row[mode][k]) for mode, k, _ in shown]
        table.add_row(*cells)
    base = "; ".join(
        f"{(m['role'] or mode)} {mode}: strict {_fmt(m['accuracy']['accuracy_query'])}, "
        f"closed {_fmt(m['accuracy']['accuracy_closed'])}" for mode, m in modes.items())
    table.caption = (f"Unablated: {base}. label→match / label→other: the query's attention "
                     "on context labels of its own label / of others; image→match: on context "
                     "images of its label; prev-token: each context label's attention on the "
                     "image before it. Δ: accuracy change with the head ablated. Layers and "
                     "heads count from 0.")
    table.caption_justify = "left"
    return table


def probe_layers_table(result):
    from rich import box
    from rich.table import Table
    table = Table(title=f"step {result.step}: each layer's attention ablated",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("layer", justify="right")
    modes = result.modes
    shown = _probe_accuracies(modes)
    for _, _, heading in shown:
        table.add_column(f"Δ {heading}", justify="right")
    layers = len(next(iter(modes.values()))["layer_ablated"])
    for layer in range(layers):
        table.add_row(str(layer), *(
            _signed(modes[mode]["layer_ablated"][layer][k] - modes[mode]["accuracy"][k])
            for mode, k, _ in shown))
    return table


def probe_steps_table(results: list, ranked: list[list[dict]]):
    """`eicl probe --all`: one row per checkpoint."""
    from rich import box
    from rich.table import Table
    table = Table(title="over training: accuracies and the most important head",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("step", justify="right")
    shown = _probe_accuracies(results[0].modes)
    for _, _, heading in shown:
        table.add_column(heading, justify="right")
    for header in ("top head", "label→match", "Δ strict", "seconds"):
        table.add_column(header, justify="right")
    for result, rows in zip(results, ranked):
        cells = [str(result.step)]
        cells += [_fmt(result.modes[mode]["accuracy"][k]) for mode, k, _ in shown]
        top = rows[0]
        cells += [f"L{top['layer']} H{top['head']}", _fmt(top["label_match"]),
                  _signed(top[top["scores_mode"]]["accuracy_query"]), f"{result.seconds:.1f}"]
        table.add_row(*cells)
    return table


def print_probe(results: list, ranked: list[list[dict]], top: int) -> None:
    """`eicl probe`'s output: over training (several checkpoints), then the
    last checkpoint's heads and layers."""
    if len(results) > 1:
        console.print(probe_steps_table(results, ranked))
    console.print(probe_heads_table(results[-1], ranked[-1], top))
    console.print(probe_layers_table(results[-1]))
    total = sum(r.seconds for r in results)
    info(f"probed {len(results)} checkpoint{'s' if len(results) != 1 else ''} in {total:.1f} s")
