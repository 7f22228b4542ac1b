"""How `eicl --help` names values, the same on every Typer the project allows.

Typer 0.27 began to show a required argument as `{target}` in the usage line
and types as `<path>`, `<int>`; Typer 0.29 added `<bool>` after every flag,
`--help` included, and `<list[str]>` after repeatable options. The options in
cli.py name their values themselves (metavar=); the command classes here make
flags show no value and arguments show as `TARGET`, `[PATHS]...` with a PATH
type, as the Typers before 0.27 did. Typer builds its parameter objects itself
(no hook chooses their class), so each argument's class is swapped for a
subclass with those two methods.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup

_PLAIN_CLASSES: dict[type, type] = {}


def argument_usage(param: Any) -> str:
    """An argument as the usage line shows it: TARGET, [TARGET], PATHS..."""
    name = param.metavar or param.name.upper()
    if not param.required:
        name = f"[{name}]"
    if param.nargs != 1:
        name += "..."
    return name


# Typer >= 0.27's type labels for arguments, as the words older Typers show.
_TYPE_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH"}


def _plain_class(base: type) -> type:
    if base not in _PLAIN_CLASSES:
        def get_usage_pieces(self: Any, ctx: Any) -> list[str]:
            return [argument_usage(self)]

        def display_type_rich(self: Any, ctx: Any) -> str | None:
            # Only Typer >= 0.27 calls this; it would show `<path>`, `<list[Path]>`.
            label = str(base.display_type_rich(self, ctx) or "").strip("<>")
            if label.startswith("list[") and label.endswith("]"):
                label = label[len("list["):-1]
            return _TYPE_WORDS.get(label, label.upper()) or None

        _PLAIN_CLASSES[base] = type(f"Plain{base.__name__}", (base,), {
            "get_usage_pieces": get_usage_pieces, "display_type_rich": display_type_rich})
    return _PLAIN_CLASSES[base]


def plain_params(params: list[Any]) -> list[Any]:
    """Flags get an empty metavar (no `<bool>`), arguments the plain class."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if param.param_type_name == "argument" and type(param) not in _PLAIN_CLASSES.values():
            param.__class__ = _plain_class(type(param))
    return params


class Command(TyperCommand):
    """A command whose help names values as plain words (see the module)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return plain_params(super().get_params(ctx))


class Group(TyperGroup):
    """The `eicl` group, with the same help style as its commands."""

    def get_params(self, ctx: Any) -> list[Any]:
        return plain_params(super().get_params(ctx))
