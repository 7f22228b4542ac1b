"""docs/config.md is generated from eicl_cli/config.py and must be current."""

from pathlib import Path

from eicl_cli import config as C
from eicl_cli import config_doc

ROOT = Path(__file__).resolve().parent.parent


def test_committed_config_reference_is_current() -> None:
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_doc.render(), (
        "docs/config.md is stale: run `python -m eicl_cli.config_doc` and commit it")


def test_every_key_has_a_description() -> None:
    assert config_doc.missing_docs() == []
    assert len(config_doc.rows()) == len(C.field_docs())


def test_check_and_write(tmp_path: Path) -> None:
    page = tmp_path / "config.md"
    assert config_doc.main(["--check", "--out", str(page)]) == 1  # missing
    assert config_doc.main(["--out", str(page)]) == 0
    assert page.read_text() == config_doc.render()
    assert list(tmp_path.iterdir()) == [page]  # no temporary file left
    assert config_doc.main(["--check", "--out", str(page)]) == 0
    page.write_text(page.read_text().replace("Peak learning rate", "Peak rate"))
    assert config_doc.main(["--check", "--out", str(page)]) == 1


def test_imports_no_jax() -> None:
    import subprocess
    import sys
    code = ("import sys, eicl_cli.config_doc as d; d.render(); "
            "assert 'jax' not in sys.modules, 'config_doc imported jax'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
