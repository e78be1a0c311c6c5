"""`sfi`: batch long-context LLM decoding with Slow-Fast Inference.

The library: config, jobs, scheduler, loader, model, cache, decoder, engine, results. The CLI
(`sfi_cli`) is a thin layer over it.
"""

from __future__ import annotations

__version__ = "0.1.0"
