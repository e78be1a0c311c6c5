"""An `sfi` command with module-level switches set, for an A/B against the defaults in the same device call.
Usage: python3 bench/ab_flags.py MODULE.NAME=VALUE [...] -- SFI-ARGS...
e.g. sfi.model.FOLD_SPLIT_SUMS=false or sfi_kernels.skinny_gemm.PREFETCH_FIRST_TILE=false; values are ints or
true/false, and NAME must exist."""

import importlib
import sys


def parse(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lstrip("-").isdigit():
        return int(text)
    sys.exit(f"ab_flags: {text!r}: a value must be an integer, true or false")


def main() -> None:
    if "--" not in sys.argv:
        sys.exit(__doc__)
    cut = sys.argv.index("--")
    for assignment in sys.argv[1:cut]:
        target, _, text = assignment.partition("=")
        module, _, name = target.rpartition(".")
        mod = importlib.import_module(module)
        if not hasattr(mod, name) or not text:
            sys.exit(f"ab_flags: {assignment!r}: expected MODULE.NAME=VALUE with NAME a variable of {module}")
        setattr(mod, name, parse(text))
        print(f"ab_flags: {module}.{name} = {getattr(mod, name)!r}", file=sys.stderr)
    from sfi_cli.main import app

    app(sys.argv[cut + 1:])


if __name__ == "__main__":
    main()
