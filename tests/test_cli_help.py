"""`eicl --help` lists each command on one short line."""

import typer.main

from eicl_cli.cli import app


def test_every_command_summary_is_one_short_line():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if cmd.hidden:
            continue
        summary = cmd.help.split("\n\n")[0]
        assert "\n" not in summary, f"{name}: summary spans lines: {summary!r}"
        assert len(summary) <= 80, f"{name}: summary of {len(summary)} characters"
