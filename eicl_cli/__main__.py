"""The one entry point: the `eicl` console script and `python -m eicl_cli`.

Re-executing for huge pages (hugepages.py) comes before anything else is
imported: the commands' imports (Typer, Rich) would otherwise be paid twice,
once in the process that is replaced. Only a process that is eicl itself
re-executes: called from inside another program (a notebook's kernel, a
user's script), exec would restart that program instead.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    program = Path(sys.argv[0])
    if program.name == "eicl" or program.resolve() == Path(__file__).resolve():
        from .hugepages import reexec_with_huge_pages
        reexec_with_huge_pages()
    from .cli import run_app
    sys.exit(run_app())


if __name__ == "__main__":  # pragma: no cover
    main()
