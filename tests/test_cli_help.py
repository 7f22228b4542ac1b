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


def test_usage_errors_are_one_line_and_exit_2(capsys):
    """An option's bad value, a missing argument, an unknown option or
    command: one line on stderr, as the library's own errors, not Typer's
    boxed usage text."""
    from eicl_cli.cli import run_app
    cases = [
        (["eval", "RUN", "-n", "abc"], "error: Invalid value for '--sequences' / '-n'"),
        (["eval"], "error: Missing argument 'target'."),
        (["train", "--bogus"], "error: No such option: --bogus"),
        (["nosuch"], "error: No such command 'nosuch'."),
    ]
    for args, start in cases:
        assert run_app(args) == 2, args
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (args, err)
        assert lines[0].endswith("--help)") and out == ""
    assert run_app(["--help"]) == 0 and "Usage" in capsys.readouterr().out
    # The library's own refusals keep their exit code and line.
    assert run_app(["report", "/nonexistent/path"]) == 2
    assert capsys.readouterr().err.startswith("error: /nonexistent/path does not exist")
