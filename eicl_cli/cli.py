"""The `eicl` command line: thin Typer commands that parse arguments and call
into the library. All user-facing errors become one line on stderr, exit 2."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EiclError
from .help_style import Command, Group

app = typer.Typer(
    name="eicl",
    help="Emergent in-context learning (Chan et al. 2022): prepare Omniglot, train, "
         "evaluate, sweep and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", metavar="PATH", help="TOML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a config key: section.key=value (TOML literal). Repeatable.")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn EiclError into a one-line message and exit code 2, no traceback;
    the output laid out for the environment the command runs in."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import display
        display.use_current_environment()
        try:
            return fn(*args, **kwargs)
        except EiclError as e:
            fail(str(e))
    return wrapper


@app.command("prepare-data", cls=Command)
@user_errors
def prepare_data(
    source: Annotated[Optional[str], typer.Option(
        "--source", metavar="SOURCE", help="Where Omniglot comes from: omitted = download the official zips "
        "(checked against their sha256); a path (the two zips, a folder holding them, or the "
        "extracted images_background/ and images_evaluation/ folders); 'tfds'; or 'synthetic' "
        "(procedurally drawn glyphs, marked synthetic).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", metavar="PATH", help="Cache folder; default $EICL_DATA_DIR, else ~/.cache/eicl.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the cache is up to date.")] = False,
    classes: Annotated[Optional[int], typer.Option(
        "--classes", metavar="INTEGER", help="Synthetic only: number of classes (default 1623, as Omniglot).")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="INTEGER", help="Synthetic only: drawing seed.")] = 0,
    url_background: Annotated[Optional[str], typer.Option(
        "--url-background", metavar="URL", envvar="EICL_OMNIGLOT_URL_BACKGROUND",
        help="Download URL of images_background.zip (mirror); its sha256 must still be the official one.")] = None,
    url_evaluation: Annotated[Optional[str], typer.Option(
        "--url-evaluation", metavar="URL", envvar="EICL_OMNIGLOT_URL_EVALUATION",
        help="Download URL of images_evaluation.zip (mirror); its sha256 must still be the official one.")] = None,
) -> None:
    """Download or import Omniglot (or draw a synthetic set) and cache it once."""
    from . import display
    from .config import data_dir as resolve_data_dir
    from .prepare import prepare_data as run_prepare

    if seed != 0 and source != "synthetic":
        raise EiclError(f"--seed {seed} only applies to --source synthetic")
    with display.PrepareProgress() as progress:
        result = run_prepare(
            source, resolve_data_dir(None, str(data_dir) if data_dir else None), force=force,
            classes=classes, seed=seed, progress=progress,
            urls={"images_background.zip": url_background, "images_evaluation.zip": url_evaluation})
    display.print_prepare_summary(result)


@app.command(cls=Command)
@user_errors
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", metavar="PATH", help="Run folder (default: <run.out_dir>/<config name>-<time>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", metavar="RUN", help="Continue this run folder from its newest intact checkpoint.")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved config (as the run will save it) and exit.")] = False,
    print_model: Annotated[bool, typer.Option(
        "--print-model", help="Print the model's parameter counts per module and exit.")] = False,
    coordinator: Annotated[Optional[str], typer.Option(
        "--coordinator", metavar="HOST:PORT", help="Multi-host: HOST:PORT of process 0 (with --num-processes, "
                              "--process-id; the run folder must be on a shared filesystem).")] = None,
    num_processes: Annotated[Optional[int], typer.Option(
        "--num-processes", metavar="INTEGER", help="Multi-host: number of processes.")] = None,
    process_id: Annotated[Optional[int], typer.Option(
        "--process-id", metavar="INTEGER", help="Multi-host: this process's index, 0..N-1.")] = None,
    distributed: Annotated[bool, typer.Option(
        "--distributed", help="Multi-host: read the cluster from the environment "
                              "(SLURM, Open MPI) via jax.distributed.initialize().")] = False,
) -> None:
    """Train a model on bursty sequences; stream accuracy per eval mode.

    Ctrl+C saves a checkpoint; continue with --resume RUN. Uses every local
    device (batch split, parameters replicated); several hosts with
    --coordinator/--num-processes/--process-id or --distributed."""
    from . import display, runs, training
    from .parallel import initialize_distributed, is_writer
    initialize_distributed(coordinator, num_processes, process_id, auto=distributed)
    cfg = training.train_config(config, out, set_ or [], resume)
    if print_config:
        display.print_json(runs.config_text(training.resolved_config(cfg)).rstrip("\n"))
        return
    if print_model:
        from .model import build_model, parameter_counts
        import jax
        # The image shape follows from the config, so no data cache is needed.
        model, _ = build_model(cfg, jax.random.key(cfg.run.seed))
        display.print_model_table(parameter_counts(model),
                                  title=f"{cfg.model.kind} ({cfg.embedding.example_encoder} "
                                        f"encoder), {cfg.num_classes} classes")
        return
    if config is None and resume is None:
        # The defaults are the paper's experiment: days on a CPU. Say so.
        display.info(f"no --config: the paper's defaults ({cfg.embedding.example_encoder} "
                     f"encoder, {cfg.run.steps:,} steps); see configs/ for others")
    start = training.start_run(cfg, config, out, resume)
    run_dir = start.run_dirs[0]
    if resume is None and is_writer():  # the folder process 0 made
        display.info(f"run folder: {run_dir}")
    try:
        outcome = training.train_runs(start.cfgs, start.run_dirs, resume=start.resume,
                                      dataset=start.dataset)
    except KeyboardInterrupt:  # a second Ctrl+C: quit at once, no checkpoint
        display.warn(f"stopped without saving; resume with: eicl train --resume {run_dir}")
        raise typer.Exit(130)
    except Exception:
        training.discard_if_unstarted(start)
        raise
    display.print_train_outcome(outcome.status, outcome.step, cfg.run.steps, run_dir,
                                runs.checkpoint_dir(run_dir))
    if outcome.status == "interrupted":
        raise typer.Exit(130)


@app.command("eval", cls=Command)
@user_errors
def eval_(
    target: Annotated[Path, typer.Argument(metavar="TARGET", help="A run folder (newest checkpoint) or a checkpoint file.")],
    mode: Annotated[Optional[list[str]], typer.Option(
        "--mode", "-m", metavar="MODE", help="Eval mode; repeatable (default: the config's eval.modes).")] = None,
    sequences: Annotated[Optional[int], typer.Option(
        "--sequences", "-n", metavar="INTEGER", help="Sequences per mode (default: eval.sequences, 10000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", metavar="INTEGER", help="Sequences per device batch (default: eval.batch_size); "
                             "the numbers do not depend on it.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """Evaluate a run or checkpoint on fixed, seeded sequences per mode."""
    import json
    import time
    from . import display, evaluate
    if mode:
        evaluate.check_modes(mode)
    if sequences is not None and sequences < 1:
        raise EiclError(f"--sequences {sequences}: must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise EiclError(f"--batch-size {batch_size}: must be at least 1")
    restored, data, generator = evaluate.restore_for_eval(target)
    cfg = restored.cfg
    modes = list(mode) if mode else list(cfg.eval.modes)
    n = sequences or cfg.eval.sequences
    started = time.perf_counter()
    results = evaluate.evaluate_modes(restored.model, restored.state, data, generator, modes, n,
                                      batch_size or cfg.eval.batch_size, cfg.eval.seed)
    took = time.perf_counter() - started
    rows = evaluate.table_rows(cfg, results)
    if json_:
        display.print_json(json.dumps({
            "checkpoint": str(restored.path), "step": restored.step,
            "sequences_per_mode": n, "eval_seed": cfg.eval.seed,
            "seconds": round(took, 3),
            "modes": {r["mode"]: {"role": r["role"], "ceiling": r["ceiling"], **r["metrics"],
                                  "sequences": r["sequences"]} for r in rows},
        }, indent=2))
        return
    display.print_eval_results(rows, title=f"{restored.path} (step {restored.step})")
    display.info(f"evaluated {len(modes) * n} sequences in {took:.1f} s "
                 f"({len(modes) * n / max(took, 1e-9):.0f} sequences/s)")


@app.command(cls=Command)
@user_errors
def probe(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A transformer run folder.")],
    step: Annotated[Optional[int], typer.Option(
        "--step", metavar="STEP", help="Probe the checkpoint of this step (default: the newest).")] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Probe every checkpoint the run kept (run.checkpoint_schedule, "
        "run.checkpoints_per_decade and the rolling ones), oldest first.")] = False,
    mode: Annotated[Optional[list[str]], typer.Option(
        "--mode", "-m", metavar="MODE", help="Eval mode; repeatable (default: the config's eval.modes).")] = None,
    sequences: Annotated[Optional[int], typer.Option(
        "--sequences", "-n", metavar="INTEGER",
        help="Sequences per mode (default: eval.train_sequences, the sets the training "
             "evaluations used).")] = None,
    ablation: Annotated[str, typer.Option(
        "--ablation", metavar="KIND", help="Replace an ablated head's output by its mean over "
        "the mode's sequences (mean) or by zero (zero).")] = "mean",
    top: Annotated[int, typer.Option("--top", metavar="K", help="Heads shown in the table; the --all plot follows at most 4 of them.")] = 8,
    json_: Annotated[bool, typer.Option("--json", help="Print every number as JSON instead of the tables.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE.png", help="Heatmaps (layer x head); with --all also the top "
        "heads' scores over training beside ICL and IWL.")] = None,
) -> None:
    """Which attention heads do in-context learning: attention scores and ablations."""
    import json
    from . import display, evaluate, probe as probing
    if step is not None and all_:
        raise EiclError("give --step or --all, not both")
    if top < 1:
        raise EiclError(f"--top {top}: must be at least 1")
    if mode:
        evaluate.check_modes(mode)
    if plot is not None:  # a bad path is refused before the work, not after
        from .plots import check_png_path
        check_png_path(plot)
    results = list(probing.probe_run(run, step=step, every=all_, modes=mode,
                                     sequences=sequences, ablation=ablation,
                                     warn=display.warn))
    if not results:
        raise EiclError(f"no checkpoint of {run} could be read; see the warnings above")
    ranked = [probing.ranked_heads(r) for r in results]
    if plot is not None:
        from .plots import plot_probe
        plot_probe(results, probing.top_heads(results, min(top, 4)), plot,
                   title=f"eicl probe {run}")
    if json_:
        display.print_json(json.dumps({"run": str(run), "checkpoints": [
            {**r.to_json(), "ranked_heads": rows} for r, rows in zip(results, ranked)]},
            indent=1))
        return
    display.print_probe(results, ranked, top)
    if plot is not None:
        display.info(f"wrote {plot}")


@app.command(cls=Command)
@user_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(metavar="SWEEP_FILE", help="Sweep TOML file: base config, seeds, and set / grid / zip tables.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", metavar="PATH", help="Sweep folder (default: <run.out_dir>/sweeps/<file stem>).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="INTEGER", help="Runs trained at the same time.")] = 1,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the runs and their state; run nothing, write nothing.")] = False,
    set_: SetOpt = None,
    stack: Annotated[int, typer.Option(
        "--stack", metavar="K", help="Train up to K runs of equal array shapes (e.g. differing only in "
                        "p_bursty, zipf_exponent or seed) in one process and one jitted "
                        "step; each keeps its own run folder.")] = 1,
    steps_per_s: Annotated[Optional[float], typer.Option(
        "--steps-per-s", metavar="FLOAT", help="With --dry-run: cost the runs at this many "
        "training steps per second (of a K-stack step with --stack K), e.g. `eicl bench`'s "
        "figure for a GPU; default: measured here on the default device.")] = None,
    launcher: Annotated[str, typer.Option(
        "--launcher", metavar="NAME", help="local: processes on this machine; slurm: one Slurm "
        "job array through submitit (needs eicl[slurm]; the sweep folder on a shared "
        "filesystem).")] = "local",
    slurm: Annotated[Optional[list[str]], typer.Option(
        "--slurm", metavar="KEY=VALUE", help="Override a [slurm] setting of the sweep file "
        "(partition, account, qos, time, gpus, cpus, mem, constraint, array_parallelism, "
        "sbatch, setup). Repeatable.")] = None,
    status: Annotated[bool, typer.Option(
        "--status", help="Show each run's Slurm task, its state and progress; submit nothing.")] = False,
    cancel: Annotated[bool, typer.Option(
        "--cancel", help="Cancel the sweep's queued and running Slurm tasks; checkpoints stay.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --status: print JSON.")] = False,
) -> None:
    """Run a grid of configs (a paper figure), resumably.

    Finished runs are skipped, interrupted ones resumed, failed ones retried."""
    from . import display, sweep as sweep_mod
    spec, sweep_runs, folder = sweep_mod.prepare(sweep_file, out, set_ or [])
    if launcher not in ("local", "slurm"):
        raise EiclError(f"--launcher {launcher!r}: must be local or slurm")
    if json_out and not status:
        raise EiclError("--json only applies to --status")
    if slurm and launcher != "slurm":
        raise EiclError("--slurm only applies to --launcher slurm")
    if status or cancel or launcher == "slurm":
        from .sweep import slurm_cli
        slurm_cli.run(spec, sweep_runs, folder, slurm or [], stack=stack, dry_run=dry_run,
                      status=status, cancel=cancel, json_out=json_out, steps_per_s=steps_per_s)
        return
    if jobs < 1:
        raise EiclError(f"--jobs {jobs}: must be at least 1")
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    keys = sweep_mod.swept_keys(spec)
    title = f"{spec.path.name}: {len(sweep_runs)} runs in {folder}"
    if spec.description:
        title += f" — {spec.description}"
    from . import cost
    if steps_per_s is not None and not dry_run:
        raise EiclError("--steps-per-s only applies to --dry-run")
    if steps_per_s is not None:
        cost.check_steps_per_s(steps_per_s)
    if dry_run:
        statuses = sweep_mod.dry_run_statuses(folder, spec, sweep_runs)
        display.print_sweep_table(statuses, keys, "dry run: " + title)
        display.print_sweep_cost(cost.sweep_cost(sweep_runs, statuses, stack, steps_per_s,
                                                 on_measure=display.measuring))
        return
    sweep_mod.write_manifest(folder, spec, sweep_runs)
    manifest = sweep_mod.read_manifest(folder)
    with display.SweepDisplay(keys, title) as live:
        result = sweep_mod.run_sweep(folder, manifest, jobs, on_change=live.update, stack=stack)
    if not live.live:
        display.print_sweep_table(result.statuses, keys, title)
    failed = [s.name for s in result.statuses if s.state == "failed"]
    if result.interrupted:
        again = sweep_mod.continue_command(sweep_file, out, set_ or [], stack, jobs)
        display.info(f"stopped; run `{again}` again to continue")
        raise typer.Exit(130)
    if failed:
        fail(f"{len(failed)} run(s) failed, e.g. {failed[0]}: see {folder}/logs/{failed[0]}.log",
             code=1)


@app.command(cls=Command)
@user_errors
def report(
    paths: Annotated[list[Path], typer.Argument(metavar="PATHS", help="Run folders and/or sweep folders.")],
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="PNG", help="Write ICL and IWL learning curves to this PNG file.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    csv_: Annotated[bool, typer.Option("--csv", help="Print CSV instead of the table.")] = False,
    closed: Annotated[bool, typer.Option(
        "--closed", help="Headline accuracy_closed (ways labels) instead of the strict "
                         "accuracy_query in the table and plot.")] = False,
    separate: Annotated[bool, typer.Option(
        "--separate", help="One row per sweep point and per run folder, even where runs "
                           "of different folders differ only in seed.")] = False,
    tensorboard: Annotated[Optional[Path], typer.Option(
        "--tensorboard", metavar="DIR",
        help="Export the runs' metrics to TensorBoard event files in DIR/<run> (for "
             "runs trained without run.trackers) instead of printing a table.")] = None,
    best_by: Annotated[Optional[str], typer.Option(
        "--best-by", metavar="METRIC",
        help="Keep only the best point (per --per group) by train_loss (mean over the last "
             "10% of logged steps), icl_loss or iwl_loss (lower is better), or icl, "
             "icl_closed or iwl (final accuracy, higher is better); table, JSON, CSV and "
             "plot show only the kept points.")] = None,
    per: Annotated[Optional[str], typer.Option(
        "--per", metavar="KEY",
        help="With --best-by: keep the best point for each value of this config key "
             "(section.key, e.g. model.kind) instead of one overall.")] = None,
) -> None:
    """Tables and plots of IWL vs ICL for runs and sweeps.

    One row per experiment (a run, or a sweep point); mean and std over its
    seeds, including runs of other folders that differ from it only in seed."""
    from . import display, report as report_mod
    if json_ and csv_:
        raise EiclError("--json and --csv: choose one output format")
    if per is not None and best_by is None:
        raise EiclError(f"--per {per} needs --best-by METRIC: which value decides the best point")
    if best_by is not None:
        report_mod.criterion(best_by)
        if per is not None:
            report_mod.check_per(per)
        if tensorboard is not None:
            raise EiclError("--best-by chooses rows of the table; --tensorboard exports every "
                            "run: give one of them")
    if tensorboard is not None:
        from . import tracking
        if not paths:
            raise EiclError("give at least one run folder or sweep folder")
        for run, dest, n in tracking.export_paths(paths, tensorboard):
            display.info(f"{run}: {n} records -> {dest}")
        display.info(f"view them with: tensorboard --logdir {tensorboard}")
        return
    rows, keys = report_mod.collect(paths, pool=not separate, warn=display.warn)
    best = None
    if best_by is not None:
        best = report_mod.choose_best(rows, keys, best_by, per, warn=display.warn)
        rows, keys = best.rows, best.keys
    title = report_mod.title(paths, rows) + (f": {best.heading()}" if best else "")
    metric = "accuracy_closed" if closed else "accuracy_query"
    if plot is not None:
        from . import plots
        plots.plot_curves(rows, keys, plot, metric=metric, title=title)
    if json_:
        display.print_json(report_mod.to_json(rows, keys, best))
    elif csv_:
        display.print_json(report_mod.to_csv(rows, keys, best).rstrip("\n"))
    else:
        headers, cells, notes = report_mod.table(rows, keys, metric, best)
        display.print_report_table(headers, cells, notes, title=title)
        if plot is not None:
            display.info(f"plot written to {plot}")


@app.command(cls=Command)
@user_errors
def sample(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    mode: Annotated[Optional[str], typer.Option(
        "--mode", "-m", metavar="MODE", help="Sequence kind: bursty, mixed, random, no_support_*, fewshot_* "
                             "(default: sequences.train_kind).")] = None,
    n: Annotated[int, typer.Option("-n", "--num", metavar="INTEGER", help="Number of sequences.")] = 4,
    seed: Annotated[int, typer.Option("--seed", metavar="INTEGER", help="Seed of the sample stream.")] = 0,
    step: Annotated[Optional[int], typer.Option(
        "--step", metavar="INTEGER", help="Show the first N sequences of this training step's batch "
                       "(exactly what `eicl train` feeds the model) instead.")] = None,
    json_: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object per sequence instead of tables.")] = False,
    png: Annotated[Optional[Path], typer.Option(
        "--png", metavar="PNG", help="Also draw the sequences as an image grid to this PNG file.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", metavar="PATH", help="Where the prepared cache lives (default: data.data_dir, "
                           "$EICL_DATA_DIR, ~/.cache/eicl).")] = None,
) -> None:
    """Show the sequences the generator makes: classes, drawings and labels."""
    import json

    from . import config as config_mod, display
    from .data.dataset import load_dataset
    from .data.sequences import KINDS, SequenceGenerator, batch_records
    cfg = (config_mod.load(config, set_ or []) if config is not None
           else config_mod.from_dict(config_mod.apply_overrides({}, set_ or [])))
    if n < 1:
        raise EiclError(f"-n {n}: must be at least 1")
    if step is not None and step < 0:
        raise EiclError(f"--step {step}: must be >= 0")
    mode = mode or cfg.sequences.train_kind
    if mode not in KINDS:
        raise EiclError(f"--mode {mode!r} is not a sequence kind; choose one of: {', '.join(KINDS)}")
    if step is not None and mode != cfg.sequences.train_kind:
        raise EiclError(f"--step shows training batches, which are {cfg.sequences.train_kind!r}; "
                        f"drop --mode {mode} or set sequences.train_kind")
    dataset = load_dataset(cfg, data_dir)
    gen = SequenceGenerator(dataset, cfg)
    if step is not None:
        batch = gen.train_batch(step, batch_size=max(n, cfg.train.batch_size)).take(slice(0, n))
    else:
        batch = gen.sample_batch(mode, n, seed)
    records = batch_records(batch, dataset)
    if png is not None:
        from .sample_png import write_png
        write_png(png, batch, dataset, cfg, seed)
    if json_:
        display.print_json("\n".join(json.dumps(r) for r in records))
    else:
        display.print_sample(records, mode)
        if png is not None:
            display.info(f"image grid written to {png}")


@app.command("train-stack", hidden=True, cls=Command)
@user_errors
def train_stack(
    names: Annotated[list[str], typer.Argument(metavar="NAMES", help="Run names in the sweep folder.")],
    sweep_dir: Annotated[Path, typer.Option("--sweep-dir", metavar="PATH", help="The sweep folder.")],
) -> None:
    """(Used by `eicl sweep --stack`.) Train several sweep runs in one stacked step."""
    from . import display, training
    start = training.start_stack(sweep_dir, names)
    try:
        outcome = training.train_runs(start.cfgs, start.run_dirs, dataset=start.dataset)
    except KeyboardInterrupt:
        display.warn("stopped without saving")
        raise typer.Exit(130)
    if outcome.status == "interrupted":
        display.info(f"interrupted at step {outcome.step}")
        raise typer.Exit(130)
    display.info(f"finished {len(names)} stacked runs at step {outcome.step}")


@app.command(cls=Command)
@user_errors
def bench(
    config: Annotated[Optional[list[Path]], typer.Option(
        "--config", "-c", metavar="PATH", help="Config to measure; repeatable (default: the paper config "
                               "and quickstart.toml).")] = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", metavar="INTEGER", help="Timed training steps after compilation (default: 3 on CPU for "
                        "ResNet configs, 100 otherwise).")] = None,
    stack: Annotated[int, typer.Option(
        "--stack", metavar="K", help="Measure K stacked replicas of each config in one step.")] = 1,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """Measure generation, compile, training and eval speed, and peak memory.

    On this machine's default JAX device; training is timed as `eicl train`
    runs it, after compilation, which is reported apart."""
    import json
    from . import bench as bench_mod, display
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    if steps is not None and steps < 1:
        raise EiclError(f"--steps {steps}: must be at least 1")
    paths = list(config) if config else bench_mod.default_config_paths()
    results = []
    for path in paths:
        cfg = bench_mod.load_for_bench(path, set_ or [])
        n = steps or bench_mod.default_steps(cfg)
        results.append(bench_mod.bench_config(cfg, steps=n, stack=stack, name=path.stem,
                                              overrides=set_))
        if json_:
            display.print_json(json.dumps(results[-1]))
    if not json_:
        display.print_bench_table(results)


def run_app(args: list[str] | None = None) -> int:
    """The commands; a usage error (an option's bad value, a missing argument,
    an unknown option) is one line on stderr and exit 2, like EiclError,
    instead of Typer's boxed usage text. Returns the exit code."""
    try:
        code = app(args=args, standalone_mode=False)
    except Exception as e:
        # Typer's (Click's) usage errors, whichever Typer: it may vendor Click.
        message, command = getattr(e, "format_message", None), getattr(e, "ctx", None)
        if message is None or not isinstance(getattr(e, "exit_code", None), int):
            raise
        if type(e).__name__ == "NoArgsIsHelpError" or command is None:
            e.show()  # `eicl` alone: its help
            return e.exit_code
        text = " ".join(message().split())
        typer.echo(f"error: {text} (see {command.command_path} --help)", err=True)
        return e.exit_code
    return code if isinstance(code, int) else 0

