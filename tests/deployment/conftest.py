"""Session fixtures of the deployment tests: one wheel of this checkout, one directory of its dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest
from releases import build_wheel, dependencies_dir, source_copy


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """exo's wheel, built (not installed) from a copy of this checkout."""
    source = source_copy(tmp_path_factory.mktemp("source"))
    return build_wheel(source, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def dependencies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dependencies_dir(tmp_path_factory.mktemp("deps") / "site-packages")
