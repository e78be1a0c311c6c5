"""`sfi bench` with some of the ranged attention kernel's defaults changed, for an A/B against the defaults in the
same device call. Usage: python3 bench/ab_kernel.py NAME=VALUE [NAME=VALUE ...] -- BENCH-ARGS...
e.g. native_tiles=false (float32-upcast tiles) or num_stages=3; values are ints or true/false."""

import inspect
import sys

from ab_flags import parse  # bench/ is the script's folder

from sfi_kernels import ranged_decode_attention


def override(assignments: list[str]) -> None:
    names = [p.name for p in inspect.signature(ranged_decode_attention).parameters.values()
             if p.default is not inspect.Parameter.empty]
    values = list(ranged_decode_attention.__defaults__)
    for assignment in assignments:
        name, _, text = assignment.partition("=")
        if name not in names or not text:
            sys.exit(f"ab_kernel: {assignment!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        values[names.index(name)] = parse(text)
    ranged_decode_attention.__defaults__ = tuple(values)


if __name__ == "__main__":
    if "--" not in sys.argv:
        sys.exit(__doc__)
    cut = sys.argv.index("--")
    override(sys.argv[1:cut])
    from sfi_cli.main import app

    app(sys.argv[cut + 1:])
