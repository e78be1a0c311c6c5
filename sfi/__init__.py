"""`sfi`: batch long-context LLM decoding with Slow-Fast Inference.

The library: config, jobs, scheduler, loader, model, cache, decoder, engine, results. The CLI
(`sfi_cli`) is a thin layer over it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _import_kernels_from_source_tree() -> None:
    """Make `import sfi_kernels` work from a source checkout on PYTHONPATH (the GPU machine runs it so).

    Installed, setuptools maps the top-level `kernels/` folder to `sfi_kernels`; from a plain checkout
    there is no such mapping, so register `kernels/` under that name once.
    """
    if "sfi_kernels" in sys.modules or importlib.util.find_spec("sfi_kernels") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "sfi_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        return
    # Lazily: the kernels import torch, which `sfi --help` and a refused lock must not pay for.
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sfi_kernels"] = module
    spec.loader.exec_module(module)


_import_kernels_from_source_tree()
