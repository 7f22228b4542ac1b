"""The `eicl` command line: thin Typer commands that parse arguments and call
into the library. All user-facing errors become one line on stderr, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EiclError

app = typer.Typer(
    name="eicl",
    help="Emergent in-context learning (Chan et al. 2022): prepare Omniglot, train, "
         "evaluate, sweep and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config key: section.key=value (TOML literal). Repeatable.")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn EiclError into a one-line message and exit code 2, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EiclError as e:
            fail(str(e))
    return wrapper


def not_built(name: str) -> None:
    fail(f"`eicl {name}` is not built yet", code=2)


@app.command("prepare-data")
@user_errors
def prepare_data() -> None:
    """Download or import Omniglot (or draw a synthetic set) and cache it once."""
    not_built("prepare-data")


@app.command()
@user_errors
def train(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train a model on bursty sequences; stream accuracy per eval mode."""
    not_built("train")


@app.command("eval")
@user_errors
def eval_() -> None:
    """Evaluate a run or checkpoint on fixed, seeded sequences per mode."""
    not_built("eval")


@app.command()
@user_errors
def sweep() -> None:
    """Run a grid of configs (a paper figure), resumably."""
    not_built("sweep")


@app.command()
@user_errors
def report() -> None:
    """Tables and plots of IWL vs ICL for runs and sweeps."""
    not_built("report")


def main() -> None:  # pragma: no cover - console entry for `python -m eicl_cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
