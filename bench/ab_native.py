"""`sfi bench` with the ranged kernel's float32-upcast tiles (native_tiles off), for an A/B against the default
in the same device call. Usage: python3 bench/ab_native.py BENCH-ARGS..."""
import inspect
import sys

import sfi  # noqa: F401  (makes kernels/ importable as sfi_kernels from a source tree)
from sfi_kernels import ranged_decode_attention

params = list(inspect.signature(ranged_decode_attention).parameters.values())
defaults = [p.name for p in params if p.default is not inspect.Parameter.empty]
values = list(ranged_decode_attention.__defaults__)
values[defaults.index("native_tiles")] = False
ranged_decode_attention.__defaults__ = tuple(values)

from sfi_cli.main import app  # noqa: E402

app(sys.argv[1:])
