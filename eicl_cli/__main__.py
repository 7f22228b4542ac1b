"""The `eicl` console script and `python -m eicl_cli`.

Re-executing for huge pages (hugepages.py) comes before anything else is
imported: the commands' imports (Typer, Rich) would otherwise be paid twice,
once in the process that is replaced.
"""

from __future__ import annotations


def main() -> None:
    from .hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()
    from .cli import main as commands
    commands()


if __name__ == "__main__":  # pragma: no cover
    main()
