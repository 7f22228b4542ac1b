"""Fixtures shared by the test modules that train on the synthetic set."""

from pathlib import Path

import pytest

from train_support import make_synthetic_cache


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh synthetic data cache per test module (modules may write next to it)."""
    return make_synthetic_cache(tmp_path_factory.mktemp("data"))
