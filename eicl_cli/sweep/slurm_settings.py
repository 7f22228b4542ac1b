"""The `[slurm]` table of a sweep file and `--slurm KEY=VALUE`: what each
array task asks of the cluster, checked here and mapped to submitit's
AutoExecutor parameters.

    [slurm]
    partition = "gpu"
    account = "lab"
    qos = "normal"
    time = 240                 # minutes per task (a longer run requeues itself)
    gpus = 1                   # per task
    cpus = 8                   # per task
    mem = 32                   # GB per task
    constraint = "a100"
    array_parallelism = 16     # at most this many tasks at once (%N)
    sbatch = ["--exclusive", "--mail-type=END"]   # more #SBATCH options
    setup = ["module load cuda", "source ~/venvs/eicl/bin/activate"]
"""

from __future__ import annotations

import difflib
from typing import Any

from .. import config as config_mod
from ..errors import EiclError

# key -> (type name shown in errors, submitit AutoExecutor parameter)
KEYS: dict[str, tuple[str, str]] = {
    "partition": ("string", "slurm_partition"),
    "account": ("string", "slurm_account"),
    "qos": ("string", "slurm_qos"),
    "time": ("positive integer (minutes)", "timeout_min"),
    "gpus": ("integer >= 0", "gpus_per_node"),
    "cpus": ("positive integer", "cpus_per_task"),
    "mem": ("positive number (GB)", "mem_gb"),
    "constraint": ("string", "slurm_constraint"),
    "array_parallelism": ("positive integer", "slurm_array_parallelism"),
    "sbatch": ("list of strings", "slurm_additional_parameters"),
    "setup": ("list of strings", "slurm_setup"),
}

# submitit asks for 5 minutes when no time is given: too short for any real
# run, so a task asks for an hour unless told, and requeues itself after it.
DEFAULT_TIME_MIN = 60


def _check_value(where: str, key: str, value: Any) -> Any:
    kind = KEYS[key][0]
    ok: bool
    if kind == "string":
        ok = isinstance(value, str) and bool(value)
    elif kind == "list of strings":
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    elif kind == "positive number (GB)":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and (
            value >= 0 if kind == "integer >= 0" else value > 0)
    if not ok:
        raise EiclError(f"{where}: {key} must be a {kind}, got {value!r}")
    if key == "sbatch":
        for line in value:
            sbatch_option(where, line)
    return value


def check_key(where: str, key: str) -> None:
    if key in KEYS:
        return
    close = difflib.get_close_matches(key, list(KEYS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"keys are {', '.join(KEYS)}"
    raise EiclError(f"{where}: unknown slurm key {key!r}; {hint}")


def check_table(where: str, table: Any) -> dict[str, Any]:
    """The [slurm] table of a sweep file, checked."""
    if not isinstance(table, dict):
        raise EiclError(f"{where}: [slurm] must be a table of key = value, got {table!r}")
    out = {}
    for key, value in table.items():
        check_key(f"{where} [slurm]", key)
        out[key] = _check_value(f"{where} [slurm]", key, value)
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--slurm KEY=VALUE (a TOML literal, or a bare string; repeatable)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EiclError(f"--slurm {item!r}: expected KEY=VALUE, e.g. partition=gpu")
        check_key("--slurm", key)
        value = config_mod.parse_override(f"x.y={text}")[1]
        if KEYS[key][0] == "string" and not isinstance(value, str):
            value = text
        out[key] = _check_value("--slurm", key, value)
    return out


def sbatch_option(where: str, line: str) -> tuple[str, Any]:
    """'--mail-type=END' or '#SBATCH --exclusive' -> (mail_type, 'END'), as
    submitit's additional parameters take them."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if not text.startswith("--") or " " in text.split("=", 1)[0]:
        raise EiclError(f"{where}: sbatch line {line!r} must be a long option, "
                        "e.g. --exclusive or --mail-type=END")
    name, sep, value = text[2:].partition("=")
    return name.replace("-", "_"), (value if sep else True)


def merged(table: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {**table, **overrides}


def executor_parameters(settings: dict[str, Any]) -> dict[str, Any]:
    """submitit AutoExecutor.update_parameters keywords for these settings."""
    params: dict[str, Any] = {"timeout_min": DEFAULT_TIME_MIN, "nodes": 1, "tasks_per_node": 1}
    for key, value in settings.items():
        name = KEYS[key][1]
        if key == "sbatch":
            value = dict(sbatch_option("[slurm]", line) for line in value)
        if key == "setup":
            value = list(value)
        params[name] = value
    return params
