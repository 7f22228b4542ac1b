"""The sweep file: its format, its checks, and its expansion into runs.

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

    [slurm]                                  # optional: for --launcher slurm
    partition = "gpu"                        # (slurm_settings.py lists the keys)

Keys are `section.key` config keys, quoted (unquoted dotted keys are read the
same way). Every key is checked against the config, and the config of every
point is built and validated, before anything runs. A point's name is made of
its swept values, e.g. `p_bursty=0.5__seed=1`; the grid keys come first in
file order, then the zip (its `label`, or each zipped value), then the seed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import EiclError
from . import slurm_settings

_TOP_KEYS = ("base", *config_mod.SWEEP_KEYS)
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_MAX_NAME = 120


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
    slurm: dict[str, Any] = field(default_factory=dict)  # the [slurm] table, checked


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
        base_raw = config_mod.read_with_bases(path.parent / base)
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
    _refuse_repeats(path, tables["grid"], tables["zip"])
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
    slurm = slurm_settings.check_table(str(path), raw.get("slurm", {}))
    return SweepSpec(path=path, description=description, base_raw=base_raw, seeds=seeds,
                     set=tables["set"], grid=tables["grid"], zip=tables["zip"],
                     zip_label=zip_label, slurm=slurm)


def _normalised(key: str, value: Any) -> Any:
    """The value as the config holds it; a value that does not fit the key
    equals nothing here, so that expand() refuses it for its type, naming
    the point."""
    try:
        return config_mod.coerce_value(key, value)
    except config_mod.ConfigError:
        return object()


def _first_repeat(items: list) -> tuple[int, int] | None:
    for j, b in enumerate(items):
        for i in range(j):
            if items[i] == b:
                return i, j
    return None


def _refuse_repeats(path: Path, grid: dict[str, list], zipped: dict[str, list]) -> None:
    """Refuse a grid value given twice, or a zip tuple given twice, once read
    as the config reads it (1 and 1.0 are one value of a float key): the same
    point would be trained twice, under two names."""
    for key, values in grid.items():
        found = _first_repeat([_normalised(key, v) for v in values])
        if found:
            a, b = (format_value(values[i]) for i in found)
            same = f"{a} twice" if a == b else f"{a} and {b}, the same value"
            raise EiclError(f"{path} [grid]: {key!r} lists {same}; give each value once")
    if not zipped:
        return
    n = len(next(iter(zipped.values())))
    rows = [tuple(_normalised(k, zipped[k][i]) for k in zipped) for i in range(n)]
    found = _first_repeat(rows)
    if found:
        i, j = found
        shown = ", ".join(f"{k} = {format_value(zipped[k][j])}" for k in zipped)
        raise EiclError(f"{path} [zip]: entries {i + 1} and {j + 1} are the same point "
                        f"({shown}); give each once")


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


def short_names(keys: list[str]) -> dict[str, str]:
    """'sequences.p_bursty' -> 'p_bursty', unless two of the keys share that name."""
    shorts = [k.split(".", 1)[-1] for k in keys]
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
    shorts = short_names(shown)

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



def prepare(sweep_file: str | Path, out: str | Path | None = None,
            overrides: list[str] | None = None) -> tuple[SweepSpec, list[SweepRun], Path]:
    """Load, check and expand a sweep; returns where it would run."""
    spec = load_sweep(sweep_file)
    sweep_runs = expand(spec, overrides)
    return spec, sweep_runs, Path(out) if out else default_out(spec)

