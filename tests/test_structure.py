"""The package's shape (docs/architecture.md): imports flow one way (no
circle between modules), no module uses another's private names, and the
pure rules load without JAX."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eicl_cli"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name taken from it or '') for every import of a
    package module, at any depth of the file (a lazy import is an import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in mods:
                    found.append((sub, ""))
                elif target in mods:
                    found.append((target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name in mods]
    return found


def test_no_import_circle_and_no_private_name_of_another_module():
    mods = _modules()
    graph = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for target, taken in _imports(name, path, mods):
            if target == name:
                continue
            if taken.startswith("_"):
                private.append(f"{name} imports {target}.{taken}")
            graph[name].add(target)
    assert not private, private

    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_pure_rules_load_without_jax():
    code = ("import sys, eicl_cli.eval_modes, eicl_cli.experiment_keys, eicl_cli.config, "
            "eicl_cli.files; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
