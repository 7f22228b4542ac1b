"""`eicl --help` lists each command on one short line, and names values in words."""

import re

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
        (["eval"], "error: Missing argument 'TARGET'."),
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


# Typer's own placeholders for a value: `<bool>` after a flag, `<list[str]>`,
# `<int>`, `<path>`, and `{target}` for a required argument (Typer >= 0.27).
PLACEHOLDER = re.compile(r"<(bool|int|float|str|path|Path|list\[)[^>]*>|[{}]")


def _help(capsys, args: list[str]) -> str:
    from eicl_cli.cli import run_app
    assert run_app([*args, "--help"]) == 0, args
    return capsys.readouterr().out


def test_help_names_values_in_words_and_flags_take_none(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # room for each option's row
    group = typer.main.get_command(app)
    pages = {"eicl": _help(capsys, [])}
    for name in group.commands:
        pages[name] = _help(capsys, [name])
    for name, page in pages.items():
        assert not PLACEHOLDER.search(page), (name, PLACEHOLDER.search(page), page)
    assert re.search(r"Usage: .*eval \[OPTIONS\] TARGET\s*$", pages["eval"], re.M)
    assert re.search(r"Usage: .*report \[OPTIONS\] PATHS\.\.\.\s*$", pages["report"], re.M)
    assert re.search(r"Usage: .*sweep \[OPTIONS\] SWEEP_FILE\s*$", pages["sweep"], re.M)
    for name, cmd in [("eicl", group), *group.commands.items()]:
        rows = {}
        for line in pages[name].splitlines():
            words = [w for w in line.strip("│ ").split() if w != "*"]  # * marks required
            if words and words[0].startswith("--"):
                rows[words[0]] = [w for w in words if not w.startswith("-")]
        for param in cmd.get_params(cmd.context_class(cmd, info_name=name)):
            if param.param_type_name != "option":
                continue
            long = next(o for o in param.opts if o.startswith("--"))
            after = rows[long][0] if rows[long] else ""
            if param.is_flag:  # no value to name: the row goes on with the help
                assert not re.fullmatch(r"[A-Z_:=]+", after), (name, long, after)
            else:
                assert param.metavar and after == param.metavar, (name, long, after)
