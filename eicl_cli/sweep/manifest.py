"""A sweep folder's record of its runs: the manifest (each run's resolved
config), the state file (what the sweep last saw of each run) and each run's
status, read from the files alone.

Running a sweep into SWEEP_OUT writes::

    SWEEP_OUT/manifest.json          the runs: name, point, seed, swept values,
                                     overrides, run folder, resolved config
    SWEEP_OUT/sweep.toml             a copy of the sweep file
    SWEEP_OUT/configs/<run>.toml     the resolved config each run starts from
    SWEEP_OUT/state.json             what the sweep last saw of each run
    SWEEP_OUT/logs/<run>.log         each run's `eicl train` output (appended)
    SWEEP_OUT/<run>/                 the run folder (runs.py)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import runs
from ..errors import EiclError
from ..files import read_text
from ..eval_modes import ICL_MODE, iwl_mode
from ..locks import pid_alive
from .spec import SweepRun, SweepSpec, swept_keys

MANIFEST = "manifest.json"
STATE_FILE = "state.json"
MANIFEST_FORMAT = 1
STATES = ("pending", "running", "finished", "failed", "interrupted")


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
        data = json.loads(read_text(path, "sweep manifest"))
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
    try:  # only a record of the last launch: unreadable, it is written afresh
        return json.loads(read_text(path, "sweep state"))
    except (json.JSONDecodeError, EiclError):
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
        try:  # the table skips a line it cannot show; a resume names it
            rec = runs.check_metrics_record(path, 0, json.loads(line))
        except (json.JSONDecodeError, EiclError):
            continue
        mode = rec.get("mode")
        if rec.get("kind") == "eval" and mode in modes and mode not in found:
            found[mode] = rec
            if len(found) == len(modes):
                break
    if len(found) < len(modes) and size > tail_bytes:
        for mode in modes:  # a long run whose last eval of this mode is further back
            if mode not in found:
                try:
                    recs = runs.read_metrics(run_dir, kind="eval", mode=mode)
                except EiclError:
                    recs = []
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



def dry_run_statuses(sweep_dir: Path, spec: SweepSpec, sweep_runs: list[SweepRun]) -> list[RunStatus]:
    """What a sweep would do, without writing anything: existing runs show their state."""
    manifest = manifest_dict(spec, sweep_runs)
    if (Path(sweep_dir) / MANIFEST).is_file():
        check_manifest(sweep_dir, manifest)  # refused as the sweep itself would be
        return statuses(sweep_dir, manifest)
    return [RunStatus(name=r.name, point=r.point, seed=r.seed, values=r.values,
                      state="pending", step=None, steps=r.config.run.steps, icl=None,
                      iwl=None, iwl_mode=iwl_mode(r.config.eval.modes)) for r in sweep_runs]

