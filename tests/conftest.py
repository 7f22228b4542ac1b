"""Fixtures shared by the test modules that train on the synthetic set."""

import os
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401 (the Slurm tests' session fixture)
from train_support import make_synthetic_cache


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh synthetic data cache per test module (modules may write next to it)."""
    return make_synthetic_cache(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory):
    """One JAX compile cache for the session (its CLI processes included),
    not the user's: tests neither fill it nor reuse what it holds."""
    if "EICL_COMPILE_CACHE" in os.environ:  # the runner chose one
        yield
        return
    os.environ["EICL_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    del os.environ["EICL_COMPILE_CACHE"]
