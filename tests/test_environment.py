"""Where compiled programs are cached (environment.py): per user, never in
the data folder a lab may share, one folder per usable CPU count."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from eicl_cli import config, environment


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("EICL_COMPILE_CACHE", "EICL_NO_COMPILE_CACHE", "XDG_CACHE_HOME",
                 "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EICL_DATA_DIR", str(tmp_path / "shared-data"))
    return tmp_path


def test_the_cache_is_per_user_not_in_the_data_folder(clean_env: Path, monkeypatch) -> None:
    home = clean_env / "home"
    assert environment.compile_cache_root() == home / ".cache" / "eicl" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    assert environment.compile_cache_root() == clean_env / "xdg" / "eicl" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # ignored, as the XDG spec says
    assert environment.compile_cache_root() == home / ".cache" / "eicl" / "jax"
    data = config.data_dir()
    assert data == clean_env / "shared-data"
    assert data not in environment.compile_cache_dir().parents


def test_eicl_compile_cache_names_the_folder_or_turns_it_off(clean_env: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setenv("EICL_COMPILE_CACHE", "~/elsewhere")
    assert environment.compile_cache_root() == clean_env / "home" / "elsewhere"
    for off in ("off", "OFF", "", " "):
        monkeypatch.setenv("EICL_COMPILE_CACHE", off)
        assert environment.compile_cache_root() is None
        assert environment.compile_cache_dir() is None
        assert environment.enable_compile_cache() is None
    monkeypatch.delenv("EICL_COMPILE_CACHE")
    monkeypatch.setenv("EICL_NO_COMPILE_CACHE", "1")  # the older switch still works
    assert environment.enable_compile_cache() is None


def test_enable_makes_a_private_folder_and_points_jax_at_it(clean_env: Path,
                                                             monkeypatch) -> None:
    import jax
    monkeypatch.setenv("EICL_COMPILE_CACHE", str(clean_env / "cc"))
    before = jax.config.jax_compilation_cache_dir
    try:
        folder = environment.enable_compile_cache()
        assert folder == environment.compile_cache_dir() and folder.parent == clean_env / "cc"
        assert jax.config.jax_compilation_cache_dir == str(folder)
        for made in (folder, folder.parent):
            assert stat.S_IMODE(made.stat().st_mode) == 0o700
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_an_unwritable_home_means_no_cache_not_an_error(clean_env: Path, monkeypatch) -> None:
    (clean_env / "home").write_text("a file, not a folder")
    assert environment.enable_compile_cache() is None


def test_compile_cache_has_one_folder_per_cpu_count(clean_env: Path, monkeypatch) -> None:
    """XLA's CPU code depends on the thread pool it was compiled for: a step
    compiled under `taskset -c 0` must not be reused by a run on two cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    one = environment.compile_cache_dir()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    two = environment.compile_cache_dir()
    assert one.parent == two.parent == environment.compile_cache_root()
    assert (one.name, two.name) == ("cpus1", "cpus2")
