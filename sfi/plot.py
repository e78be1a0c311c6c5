"""The bench PNG: decode tok/s against context length, one panel per batch size, for SFI, `dense` and
`transformers.generate`, with each one's bandwidth roofline dashed. Needs matplotlib (`sfi[plot]`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

SERIES = (("sfi", "SFI", "tab:green"), ("dense", "dense", "tab:blue"), ("hf_generate", "transformers.generate",
                                                                        "tab:gray"))


def plot_bench(results: Sequence[dict], path: Path) -> None:
    """Draw the runs of one or more `sfi bench` results (as written by --json) into a PNG at `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'sfi[plot]' (or plot the --json file "
                          "later, on another machine, with `sfi plot`)") from None
    runs = [r for res in results for r in res["runs"] if "error" not in r]
    if not runs:
        raise ConfigError("no successful runs to plot")
    batches = sorted({r["batch"] for r in runs})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = sorted((r for r in runs if r["batch"] == batch), key=lambda r: r["ctx"])
        ctx = [r["ctx"] for r in rows]
        for key, label, color in SERIES:
            points = [(r["ctx"], r[key]["tok_s"]) for r in rows if "tok_s" in r.get(key, {})]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, label=label)
            roof = [(r["ctx"], r[key]["roofline_tok_s"]) for r in rows if "roofline_tok_s" in r.get(key, {})]
            if roof:
                ax.plot(*zip(*roof, strict=True), linestyle="--", marker="_", markersize=14, color=color, alpha=0.6,
                        label=f"{label} roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ctx, [f"{c // 1024}k" if c >= 1024 else str(c) for c in ctx])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    devices = sorted({res["device"] for res in results})
    fig.suptitle(f"sfi bench: {', '.join(sorted({res['preset'] for res in results}))} on {', '.join(devices)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
