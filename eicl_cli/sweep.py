"""Sweeps: a grid of configs, each trained by its own `eicl train` process,
resumable run by run.

A sweep file is TOML::

    # Figure 2 (burstiness)
    description = "ICL vs IWL as the share of bursty sequences grows"
    base = "../images_all_exemplars.toml"   # a config file, relative to this file
    seeds = [0, 1, 2]                        # -> run.seed; each point runs once per seed

    [set]                                    # overrides applied to every point
    "run.steps" = 100000

    [grid]                                   # cartesian product over these keys
    "sequences.p_bursty" = [0.0, 0.5, 0.9, 1.0]

    [zip]                                    # keys that vary together (equal-length lists)
    "classes.n_rare" = [100, 1603]
    "classes.n_holdout" = [10, 10]
    label = ["small", "paper"]               # optional: names the zipped tuples

Keys are `section.key` config keys, quoted (unquoted dotted keys are read the
same way). Every key is checked against the config, and the config of every
point is built and validated, before anything runs. A point's name is made of
its swept values, e.g. `p_bursty=0.5__seed=1`; the grid keys come first in
file order, then the zip (its `label`, or each zipped value), then the seed.

Running a sweep into SWEEP_OUT writes::

    SWEEP_OUT/manifest.json          the runs: name, point, seed, swept values,
                                     overrides, run folder, resolved config
    SWEEP_OUT/sweep.toml             a copy of the sweep file
    SWEEP_OUT/configs/<run>.toml     the resolved config each run starts from
    SWEEP_OUT/state.json             what the sweep last saw of each run
    SWEEP_OUT/logs/<run>.log         each run's `eicl train` output (appended)
    SWEEP_OUT/<run>/                 the run folder (runs.py)

Each run is one `eicl train` process (`--jobs` at a time). Restarting the same
sweep skips finished runs, resumes interrupted ones with `--resume`, and
retries failed ones. A run is finished when its newest checkpoint is at
`run.steps`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import config as config_mod
from . import runs, sweep_devices
from .errors import EiclError
from .locks import FolderLock, pid_alive

MANIFEST = "manifest.json"
STATE_FILE = "state.json"
LOCK_FILE = ".sweep.lock"
LOG_DIR = "logs"
MANIFEST_FORMAT = 1
STATES = ("pending", "running", "finished", "failed", "interrupted")
_TOP_KEYS = ("base", *config_mod.SWEEP_KEYS)
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_MAX_NAME = 120


# ---------------------------------------------------------------- the sweep file

@dataclass(frozen=True)
class SweepSpec:
    path: Path
    description: str
    base_raw: dict                     # the base config, `base` chain resolved
    seeds: list[int] | None            # None: the base's run.seed, once
    set: dict[str, Any]
    grid: dict[str, list]
    zip: dict[str, list]
    zip_label: list[str] | None


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep: a grid point at one seed."""
    name: str                          # run folder name, unique in the sweep
    point: str                         # the name without the seed: groups seeds
    seed: int
    values: dict[str, Any]             # swept key -> value (plus "label" for zips)
    overrides: dict[str, Any]          # every key set on top of the base config
    config: config_mod.Config


def _config_keys() -> list[str]:
    return [key for key, _, _ in config_mod.field_docs()]


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{'sequences': {'p_bursty': [..]}} and {'sequences.p_bursty': [..]} alike."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def check_key(where: str, key: str) -> None:
    """Refuse a key that is not a config key, naming the nearest one."""
    keys = _config_keys()
    if key in keys:
        return
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close and "." not in key:
        close = [k for k in keys if k.endswith("." + key)][:1]
    hint = f"; did you mean {close[0]!r}?" if close else "; keys are section.key, e.g. sequences.p_bursty"
    raise EiclError(f"{where}: {key!r} is not a config key{hint}")


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (keys, list shapes); configs are built by expand()."""
    path = Path(path)
    raw = config_mod.read_toml_file(path, "sweep")
    for k in raw:
        if k not in _TOP_KEYS:
            close = difflib.get_close_matches(k, _TOP_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(_TOP_KEYS)}"
            raise EiclError(f"{path}: unknown sweep key {k!r}; {hint}")

    base = raw.get("base")
    if base is None:
        base_raw: dict = {}
    elif isinstance(base, str):
        base_raw = config_mod._read_toml((path.parent / base).resolve())
    else:
        raise EiclError(f"{path}: base must be a config file path string, got {base!r}")

    description = raw.get("description", "")
    if not isinstance(description, str):
        raise EiclError(f"{path}: description must be a string, got {description!r}")

    seeds = raw.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds
                or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)):
            raise EiclError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise EiclError(f"{path}: seeds {seeds} repeat a value; each seed must be distinct")

    tables = {}
    for name in ("set", "grid", "zip"):
        t = raw.get(name, {})
        if not isinstance(t, dict):
            raise EiclError(f"{path}: [{name}] must be a table of \"section.key\" = value")
        tables[name] = _flatten(t)

    zip_label = tables["zip"].pop("label", None)
    for name, t in tables.items():
        for key in t:
            check_key(f"{path} [{name}]", key)
    for name in ("grid", "zip"):
        for key, values in tables[name].items():
            if not isinstance(values, list):
                raise EiclError(f"{path} [{name}]: {key!r} must be a list of values, got {values!r}")
            if not values:
                raise EiclError(f"{path} [{name}]: {key!r} has an empty list of values")
    lengths = {k: len(v) for k, v in tables["zip"].items()}
    if len(set(lengths.values())) > 1:
        raise EiclError(f"{path} [zip]: lists must have equal lengths, got "
                        + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    if zip_label is not None:
        if not tables["zip"]:
            raise EiclError(f"{path} [zip]: label given but no zipped keys")
        n = next(iter(lengths.values()))
        if (not isinstance(zip_label, list) or len(zip_label) != n
                or not all(isinstance(x, str) and x for x in zip_label)):
            raise EiclError(f"{path} [zip]: label must be a list of {n} non-empty strings, "
                            f"got {zip_label!r}")
        if len(set(zip_label)) != n:
            raise EiclError(f"{path} [zip]: label {zip_label} repeats a name")
    for a, b in (("set", "grid"), ("set", "zip"), ("grid", "zip")):
        both = sorted(set(tables[a]) & set(tables[b]))
        if both:
            raise EiclError(f"{path}: {both[0]!r} is in both [{a}] and [{b}]; give it in one place")
    if "run.seed" in tables["grid"] or "run.seed" in tables["zip"]:
        raise EiclError(f"{path}: vary run.seed with the top-level `seeds = [...]` list, "
                        "not in [grid] or [zip]")
    if not tables["grid"] and not tables["zip"] and len(seeds or []) < 2:
        raise EiclError(f"{path}: the grid is empty; give [grid] \"section.key\" = [values...] "
                        "(or [zip], or two or more seeds)")
    return SweepSpec(path=path, description=description, base_raw=base_raw, seeds=seeds,
                     set=tables["set"], grid=tables["grid"], zip=tables["zip"],
                     zip_label=zip_label)


# ---------------------------------------------------------------- expansion

def format_value(value: Any) -> str:
    """A swept value as it appears in a point name and a table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "+".join(format_value(v) for v in value)
    return str(value)


def _short_names(keys: list[str]) -> dict[str, str]:
    """'sequences.p_bursty' -> 'p_bursty', unless two swept keys share that name."""
    shorts = [k.split(".", 1)[1] for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts)}


def _safe(text: str) -> str:
    return _SAFE.sub("-", text)


def _set_key(raw: dict, key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    raw.setdefault(section, {})
    raw[section] = dict(raw[section])
    raw[section][name] = value


def _name(parts: list[str]) -> str:
    name = "__".join(parts)
    if len(name) > _MAX_NAME:  # keep folder names short but still unique and stable
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = name[:_MAX_NAME - 12] + "--" + digest
    return name


def expand(spec: SweepSpec, extra: list[str] | None = None) -> list[SweepRun]:
    """Every (grid point x zip tuple x seed), each with a validated config.

    `extra` are --set overrides from the command line, applied to every point
    after [set] and before the swept values."""
    extra_over: dict[str, Any] = {}
    for item in extra or []:
        key, value = config_mod.parse_override(item)
        check_key("--set", key)
        if key in spec.grid or key in spec.zip:
            raise EiclError(f"--set {key}: that key is swept by {spec.path}; it cannot also be fixed")
        extra_over[key] = value

    grid_keys = list(spec.grid)
    zip_keys = list(spec.zip)
    shown = grid_keys + ([] if spec.zip_label else zip_keys)
    shorts = _short_names(shown)

    combos: list[dict[str, Any]] = [{}]
    for key in grid_keys:
        combos = [dict(c, **{key: v}) for c in combos for v in spec.grid[key]]
    n_zip = len(spec.zip[zip_keys[0]]) if zip_keys else 0
    if zip_keys:
        combos = [dict(c, **{k: spec.zip[k][i] for k in zip_keys}, __zip__=i)
                  for c in combos for i in range(n_zip)]
    seeds = spec.seeds if spec.seeds is not None else [None]

    out: list[SweepRun] = []
    names: dict[str, str] = {}
    for combo in combos:
        zi = combo.pop("__zip__", None)
        parts = [f"{shorts[k]}={_safe(format_value(combo[k]))}" for k in grid_keys]
        if zip_keys and spec.zip_label:
            parts.append(_safe(spec.zip_label[zi]))
        elif zip_keys:
            parts += [f"{shorts[k]}={_safe(format_value(combo[k]))}" for k in zip_keys]
        values = dict(combo)
        if zip_keys and spec.zip_label:
            values = {k: combo[k] for k in grid_keys}
            values["label"] = spec.zip_label[zi]
            values.update({k: combo[k] for k in zip_keys})
        for seed in seeds:
            overrides = {**spec.set, **extra_over, **combo}
            raw = json.loads(json.dumps(spec.base_raw))  # a deep copy of plain TOML data
            for key, value in overrides.items():
                _set_key(raw, key, value)
            if seed is not None:
                _set_key(raw, "run.seed", seed)
                overrides["run.seed"] = seed
            point = _name(parts) if parts else "base"
            seed_shown = seed if seed is not None else raw.get("run", {}).get("seed", 0)
            name = _name(parts + [f"seed={seed_shown}"])
            _set_key(raw, "run.name", name)
            try:
                cfg = config_mod.from_dict(raw)
            except EiclError as e:
                raise EiclError(f"{spec.path}: point {name}: {e}") from None
            if name in names:
                raise EiclError(f"{spec.path}: two points share the name {name!r} "
                                f"({names[name]} and {point}); make the swept values distinct")
            names[name] = point
            out.append(SweepRun(name=name, point=point, seed=cfg.run.seed, values=values,
                                overrides=overrides, config=cfg))
    return out


def swept_keys(spec: SweepSpec) -> list[str]:
    """The keys that name a point (a zip with a label is named by the label)."""
    return list(spec.grid) + (["label"] if spec.zip_label else list(spec.zip))


# ---------------------------------------------------------------- manifest

def default_out(spec: SweepSpec) -> Path:
    out_dir = spec.base_raw.get("run", {}).get("out_dir", config_mod.RunConfig.out_dir)
    return Path(out_dir) / "sweeps" / spec.path.stem


def manifest_dict(spec: SweepSpec, sweep_runs: list[SweepRun]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "sweep_file": str(spec.path.resolve()),
        "description": spec.description,
        "swept_keys": swept_keys(spec),
        "runs": [{
            "name": r.name, "point": r.point, "seed": r.seed,
            "values": r.values, "overrides": r.overrides,
            "run_dir": r.name, "config_file": f"configs/{r.name}.toml",
            "config": config_mod.to_dict(r.config),
        } for r in sweep_runs],
    }


def read_manifest(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise EiclError(f"{sweep_dir} is not a sweep folder: it has no {MANIFEST}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EiclError(f"{path} is not valid JSON ({e}); was it edited by hand?") from None
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("runs"), list):
        raise EiclError(f"{path}: unknown manifest format {data.get('format')!r}")
    return data


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def write_manifest(sweep_dir: Path, spec: SweepSpec, sweep_runs: list[SweepRun]) -> None:
    """Write (or extend) SWEEP_OUT/manifest.json; refuses to change a run it already holds."""
    sweep_dir = Path(sweep_dir)
    new = manifest_dict(spec, sweep_runs)
    check_manifest(sweep_dir, new)
    runs.make_dir(sweep_dir / "configs", "sweep folder")
    for r in sweep_runs:
        runs.atomic_write_bytes(sweep_dir / "configs" / f"{r.name}.toml",
                                config_mod.to_toml(r.config).encode())
    runs.atomic_write_bytes(sweep_dir / "sweep.toml", spec.path.read_bytes())
    runs.atomic_write_bytes(sweep_dir / MANIFEST, _json_bytes(new))


def check_manifest(sweep_dir: Path, new: dict) -> None:
    """Refuse a sweep that would change a run the folder already holds."""
    if not (Path(sweep_dir) / MANIFEST).is_file():
        return
    old = {r["name"]: r for r in read_manifest(sweep_dir)["runs"]}
    for r in new["runs"]:
        prev = old.get(r["name"])
        if prev is not None and prev["config"] != r["config"]:
            diff = _first_difference(prev["config"], r["config"])
            raise EiclError(
                f"{sweep_dir} already holds run {r['name']} with a different config "
                f"({diff}); to continue it, give the --set values it started with; "
                f"else use another --out, or remove that folder to start over")


def _first_difference(a: dict, b: dict) -> str:
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                return f"{section}.{key} was {sa.get(key)!r}, now {sb.get(key)!r}"
    return "no key differs"


# ---------------------------------------------------------------- run state

def run_progress(run_dir: Path) -> int | None:
    """Step of the newest checkpoint, or None when there is none."""
    ckpts = runs.list_checkpoints(run_dir)
    return ckpts[-1][0] if ckpts else None


def is_finished(run_dir: Path, steps: int) -> bool:
    step = run_progress(run_dir)
    return runs.is_run_dir(run_dir) and step is not None and step >= steps


def read_state(sweep_dir: Path) -> dict[str, dict]:
    path = Path(sweep_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def write_state(sweep_dir: Path, state: dict[str, dict]) -> None:
    runs.atomic_write_bytes(Path(sweep_dir) / STATE_FILE, _json_bytes(state))


def run_state(sweep_dir: Path, name: str, steps: int, recorded: dict | None) -> str:
    """pending / running / finished / failed / interrupted, from the files alone."""
    run_dir = Path(sweep_dir) / name
    if is_finished(run_dir, steps):
        return "finished"
    recorded = recorded or {}
    if recorded.get("state") == "running" and pid_alive(recorded.get("pid")):
        return "running"
    if recorded.get("state") == "failed":
        return "failed"
    if runs.is_run_dir(run_dir) or recorded.get("state") in ("running", "interrupted"):
        return "interrupted"
    return "pending"


@dataclass
class RunStatus:
    """What the sweep table shows for one run."""
    name: str
    point: str
    seed: int
    values: dict[str, Any]
    state: str
    step: int | None
    steps: int
    icl: float | None
    iwl: float | None
    iwl_mode: str | None
    returncode: int | None = None


def iwl_mode(modes: Iterable[str]) -> str | None:
    """The no_support mode that measures IWL: zipfian (all trained classes) first."""
    modes = list(modes)
    for m in ("no_support_zipfian", "no_support_common", "no_support_rare"):
        if m in modes:
            return m
    return None


ICL_MODE = "fewshot_holdout"


def latest_eval(run_dir: Path, modes: tuple[str, ...], tail_bytes: int = 1 << 16) -> dict[str, dict]:
    """The newest eval record of each mode, reading only the end of metrics.jsonl."""
    path = Path(run_dir) / runs.METRICS_FILE
    found: dict[str, dict] = {}
    if not path.is_file():
        return found
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        mode = rec.get("mode")
        if rec.get("kind") == "eval" and mode in modes and mode not in found:
            found[mode] = rec
            if len(found) == len(modes):
                break
    if len(found) < len(modes) and size > tail_bytes:
        for mode in modes:  # a long run whose last eval of this mode is further back
            if mode not in found:
                recs = runs.read_metrics(run_dir, kind="eval", mode=mode)
                if recs:
                    found[mode] = recs[-1]
    return found


def statuses(sweep_dir: Path, manifest: dict | None = None) -> list[RunStatus]:
    sweep_dir = Path(sweep_dir)
    manifest = manifest or read_manifest(sweep_dir)
    state = read_state(sweep_dir)
    out = []
    for r in manifest["runs"]:
        steps = r["config"]["run"]["steps"]
        run_dir = sweep_dir / r["run_dir"]
        mode = iwl_mode(r["config"]["eval"]["modes"])
        wanted = tuple(m for m in (ICL_MODE, mode) if m)
        ev = latest_eval(run_dir, wanted) if run_dir.is_dir() else {}
        rec = state.get(r["name"], {})
        out.append(RunStatus(
            name=r["name"], point=r["point"], seed=r["seed"], values=r["values"],
            state=run_state(sweep_dir, r["run_dir"], steps, rec),
            step=run_progress(run_dir), steps=steps,
            icl=ev.get(ICL_MODE, {}).get("accuracy_query"),
            iwl=ev.get(mode, {}).get("accuracy_query") if mode else None,
            iwl_mode=mode, returncode=rec.get("returncode")))
    return out


# ---------------------------------------------------------------- running

@dataclass
class Task:
    """One process of the sweep: one run, or (--stack) several runs trained in
    one stacked step."""
    runs: list[str]
    command: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    slot: int = 0  # which of the --jobs slots (and so which GPUs) it runs in


def train_command(sweep_dir: Path, name: str, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "eicl_cli.cli", "train"]
    run_dir = str(Path(sweep_dir) / name)
    if resume:
        return base + ["--resume", run_dir]
    return base + ["--config", str(Path(sweep_dir) / "configs" / f"{name}.toml"), "--out", run_dir]


CommandFn = Callable[[Path, str, bool], list[str]]


def stack_command(sweep_dir: Path, names: list[str]) -> list[str]:
    """One process training several runs in one stacked step (stack.py)."""
    return [sys.executable, "-m", "eicl_cli.cli", "train-stack", "--sweep-dir",
            str(sweep_dir), *names]


def plan_stacked_tasks(sweep_dir: Path, todo: list[tuple[str, str]], manifest: dict,
                       stack: int) -> list[Task]:
    """Runs that can share a step (same shapes, same progress) in tasks of up
    to `stack` runs; the rest alone. Order follows `todo`."""
    from .stack import stack_key
    configs = {r["name"]: config_mod.from_dict(r["config"]) for r in manifest["runs"]}
    groups: dict[tuple, list[str]] = {}
    for name, _ in todo:
        progress = run_progress(Path(sweep_dir) / name) or 0
        groups.setdefault((stack_key(configs[name]), progress), []).append(name)
    tasks = []
    for names in groups.values():
        for i in range(0, len(names), stack):
            chunk = names[i:i + stack]
            log = Path(sweep_dir) / LOG_DIR / f"{chunk[0]}.log"
            if len(chunk) == 1:  # nothing to stack it with: an ordinary run
                resume = runs.is_run_dir(Path(sweep_dir) / chunk[0])
                tasks.append(Task(runs=chunk, command=train_command(sweep_dir, chunk[0], resume),
                                  log=log))
            else:
                tasks.append(Task(runs=chunk, command=stack_command(sweep_dir, chunk), log=log))
    return tasks


def plan_tasks(sweep_dir: Path, todo: list[tuple[str, str]],
               command: CommandFn = train_command) -> list[Task]:
    """One task per run to do; `todo` is (name, state)."""
    tasks = []
    for name, state in todo:
        run_dir = Path(sweep_dir) / name
        resume = runs.is_run_dir(run_dir)
        tasks.append(Task(runs=[name], command=command(sweep_dir, name, resume),
                          log=Path(sweep_dir) / LOG_DIR / f"{name}.log"))
    return tasks


def _prepare_fresh(run_dir: Path) -> None:
    """A run killed before it wrote its config holds at most empty folders:
    clear them so `eicl train --out` finds the folder empty."""
    if not run_dir.exists():
        return
    for p in run_dir.rglob("*"):
        if not p.is_dir():
            raise EiclError(f"{run_dir} holds {p.name} but no config.toml; it is not a run "
                            "this sweep can continue; move it away and start again")
    shutil.rmtree(run_dir)


def sweep_lock(sweep_dir: Path) -> FolderLock:
    """One sweep process per folder (SWEEP_OUT/.sweep.lock)."""
    return FolderLock(Path(sweep_dir) / LOCK_FILE, f"sweep folder {sweep_dir}")


@dataclass
class SweepResult:
    statuses: list[RunStatus]
    interrupted: bool
    launched: int


def run_sweep(sweep_dir: Path, manifest: dict, jobs: int,
              on_change: Callable[[list[RunStatus], str], None] | None = None,
              poll_s: float = 1.0, stop_timeout_s: float = 300.0,
              command: CommandFn = train_command, stack: int = 1) -> SweepResult:
    """Run every run that is not finished, `jobs` at a time.

    Ctrl+C (SIGINT) or SIGTERM stops launching, passes SIGINT to every child
    (each saves a checkpoint and exits) and waits for them; a second signal
    kills them. `on_change(statuses, message)` is called whenever a run starts
    or ends, and every `poll_s` seconds with an empty message. `command`
    builds a run's command line (sweep folder, run name, resume?). With
    `stack` K > 1, runs of equal shapes and progress train K to a process in
    one stacked step (each still in its own run folder; logs/<first run>.log)."""
    sweep_dir = Path(sweep_dir)
    if jobs < 1:
        raise EiclError(f"--jobs {jobs}: must be at least 1")
    if stack < 1:
        raise EiclError(f"--stack {stack}: must be at least 1")
    notify = on_change or (lambda s, m: None)
    with sweep_lock(sweep_dir):
        state = read_state(sweep_dir)
        todo = []
        for st in statuses(sweep_dir, manifest):
            if st.state == "running":  # a trainer an earlier, killed sweep left behind
                raise EiclError(f"run {st.name} is still being trained by pid "
                                f"{state[st.name]['pid']} (left by an earlier sweep); "
                                "wait for it to end or stop it, then start the sweep again")
            if st.state != "finished":
                todo.append((st.name, st.state))
            elif state.get(st.name, {}).get("state") != "finished":
                state.setdefault(st.name, {})["state"] = "finished"
        for name, st in todo:
            state[name] = {"state": st, "attempts": state.get(name, {}).get("attempts", 0)}
            if not runs.is_run_dir(sweep_dir / name):
                _prepare_fresh(sweep_dir / name)
        write_state(sweep_dir, state)
        queue = (plan_stacked_tasks(sweep_dir, todo, manifest, stack) if stack > 1
                 else plan_tasks(sweep_dir, todo, command))
        active: list[Task] = []
        stopping = {"count": 0}

        def handler(signum: int, frame: Any) -> None:
            stopping["count"] += 1
            for t in active:
                if t.proc and t.proc.poll() is None:
                    try:
                        os.killpg(t.proc.pid, signal.SIGINT if stopping["count"] == 1
                                  else signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        launched = 0
        gpus = sweep_devices.visible_gpus()
        slots = sweep_devices.device_slots(
            jobs, gpus, [r["config"]["train"]["batch_size"] for r in manifest["runs"]])
        sharing = sweep_devices.jobs_per_device(jobs, gpus)
        free = list(range(jobs))
        try:
            while queue or active:
                while queue and len(active) < jobs and not stopping["count"]:
                    task = queue.pop(0)
                    task.slot = free.pop(0)
                    visible = slots[task.slot]
                    env = sweep_devices.child_env(dict(os.environ), visible, sharing)
                    where = f" [CUDA_VISIBLE_DEVICES={visible}]" if visible is not None else ""
                    task.log.parent.mkdir(parents=True, exist_ok=True)
                    log = open(task.log, "ab")
                    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                              f"{' '.join(task.command)}{where}\n".encode())
                    log.flush()
                    # Own process group: we decide when children get SIGINT, so a
                    # terminal Ctrl+C and a programmatic stop behave the same.
                    task.proc = subprocess.Popen(task.command, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=env,
                                                 start_new_session=True)
                    log.close()
                    task.started = time.time()
                    active.append(task)
                    launched += 1
                    for name in task.runs:
                        state[name] = {"state": "running", "pid": task.proc.pid,
                                       "started": task.started,
                                       "attempts": state.get(name, {}).get("attempts", 0) + 1}
                    write_state(sweep_dir, state)
                    on = f" on GPU {visible}" if visible is not None else ""
                    notify(statuses(sweep_dir, manifest), f"started {', '.join(task.runs)}{on}")
                if stopping["count"] and queue:
                    queue.clear()
                time.sleep(poll_s)
                done = [t for t in active if t.proc.poll() is not None]
                for task in done:
                    active.remove(task)
                    free.append(task.slot)
                    free.sort()
                    rc = task.proc.returncode
                    for name in task.runs:
                        steps = _steps(manifest, name)
                        if is_finished(sweep_dir / name, steps):
                            new = "finished"
                        elif stopping["count"] or rc in (-signal.SIGINT, 130, -signal.SIGKILL):
                            new = "interrupted"
                        else:
                            new = "failed"
                        state[name].update(state=new, returncode=rc, ended=time.time())
                    write_state(sweep_dir, state)
                    notify(statuses(sweep_dir, manifest),
                           f"{', '.join(task.runs)} {state[task.runs[0]]['state']} (exit {rc})")
                if not done:
                    notify(statuses(sweep_dir, manifest), "")
                if stopping["count"] and active:
                    _wait_or_kill(active, stop_timeout_s, stopping)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for t in active:  # only on an unexpected error: never leave children behind
                if t.proc and t.proc.poll() is None:
                    os.killpg(t.proc.pid, signal.SIGKILL)
                    t.proc.wait()
        return SweepResult(statuses=statuses(sweep_dir, manifest),
                           interrupted=bool(stopping["count"]), launched=launched)


def _wait_or_kill(active: list[Task], timeout_s: float, stopping: dict) -> None:
    """After a stop request, give children time to checkpoint, then kill them."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(t.proc.poll() is None for t in active):
        time.sleep(0.2)
    for t in active:
        if t.proc.poll() is None:
            stopping["count"] += 1
            os.killpg(t.proc.pid, signal.SIGKILL)


def _steps(manifest: dict, name: str) -> int:
    for r in manifest["runs"]:
        if r["name"] == name:
            return r["config"]["run"]["steps"]
    raise KeyError(name)


def continue_command(sweep_file: str | Path, out: str | Path | None, overrides: list[str],
                     stack: int = 1, jobs: int = 1) -> str:
    """The command line that continues an interrupted sweep: its file, folder
    and --set values (other values would be refused as a different config),
    and its --stack and --jobs."""
    words = ["eicl", "sweep", str(sweep_file)] + (["--out", str(out)] if out else [])
    for override in overrides:
        words += ["--set", override]
    words += [f"--{name}={value}" for name, value in (("stack", stack), ("jobs", jobs))
              if value > 1]
    return shlex.join(words)


def prepare(sweep_file: str | Path, out: str | Path | None = None,
            overrides: list[str] | None = None) -> tuple[SweepSpec, list[SweepRun], Path]:
    """Load, check and expand a sweep; returns where it would run."""
    spec = load_sweep(sweep_file)
    sweep_runs = expand(spec, overrides)
    return spec, sweep_runs, Path(out) if out else default_out(spec)


def dry_run_statuses(sweep_dir: Path, spec: SweepSpec, sweep_runs: list[SweepRun]) -> list[RunStatus]:
    """What a sweep would do, without writing anything: existing runs show their state."""
    manifest = manifest_dict(spec, sweep_runs)
    if (Path(sweep_dir) / MANIFEST).is_file():
        check_manifest(sweep_dir, manifest)  # refused as the sweep itself would be
        return statuses(sweep_dir, manifest)
    return [RunStatus(name=r.name, point=r.point, seed=r.seed, values=r.values,
                      state="pending", step=None, steps=r.config.run.steps, icl=None,
                      iwl=None, iwl_mode=iwl_mode(r.config.eval.modes)) for r in sweep_runs]
