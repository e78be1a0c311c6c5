"""Everything the user sees on stderr: progress, messages, bad lines, the run summary.

On a terminal: a rich progress bar and a table. Otherwise (cron, pipes): plain `sfi: ...` lines.
With --quiet: nothing (errors are printed by main, not here).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sfi.results import write_whole

if TYPE_CHECKING:  # the engine imports torch: `sfi --help` must not
    from sfi.engine import RunSummary
    from sfi.jobs import JobProblem
    from sfi.results import JobResult


class Reporter:
    """The engine's Observer for the CLI."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        # Wide enough for the bench table when stderr is a log file rather than a terminal.
        self.console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        self.tty = self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.tokens_total = 0
        self.started = time.perf_counter()

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        elif self.tty:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(f"sfi: {text}", file=self.console.file, flush=True)

    def message(self, text: str) -> None:
        self._line(text)

    def problem(self, problem: JobProblem) -> None:
        self._line(f"bad job: {problem}")

    def start(self, jobs: int) -> None:
        self.started = time.perf_counter()
        if self.quiet or not self.tty or jobs == 0:
            return
        self.progress = Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console)
        self.task = self.progress.add_task("jobs", total=jobs, rate="")
        self.progress.start()

    def tokens(self, n: int) -> None:
        self.tokens_total += n
        if self.progress is not None:
            rate = self.tokens_total / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, rate=f"{rate:,.1f} tok/s")

    def job_done(self, result: JobResult) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)
        if result.finish_reason == "error":
            self._line(f"job {result.id} failed: {result.error}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, s: RunSummary) -> None:
        self.close()
        if self.quiet:
            return
        rows = [
            ("model", f"{s.model or '-'} on {s.device or '-'} (loaded in {s.load_s:.1f}s)"),
            ("jobs", f"{s.succeeded} ok, {s.failed} failed, {s.skipped} already done"
                     + (f", {s.invalid_lines} bad line(s)" if s.invalid_lines else "")),
            ("tokens", f"{s.prompt_tokens:,} prompt, {s.completion_tokens:,} generated"),
            ("time", (f"summed over {s.workers} workers: " if s.workers > 1 else "")
                     + f"load {s.load_s:.1f}s, prefill {s.prefill_s:.1f}s, decode {s.decode_s:.1f}s "
                     f"({s.decode_tok_s:,.1f} tok/s), "
                     + (f"dense comparison {s.compare_s:.1f}s, " if s.compare_s else "")
                     + f"other {s.idle_s:.1f}s; {s.end_to_end_tok_s:,.1f} tok/s and "
                     f"{s.jobs_per_hour:,.0f} jobs/hour end to end"),
            *([("prefill", f"{s.prefill_tokens_computed:,} tokens computed, {s.prefill_tokens_reused:,} reused "
                           "from shared prefixes")] if s.prefill_tokens_reused else []),
            ("steps", _sfi_line(s)),
            *([("budget", s.budget)] if s.budget else []),
            ("elapsed", f"{s.elapsed_s:.1f}s" + ("  (interrupted)" if s.interrupted else "")),
        ]
        if self.tty:
            table = Table(title="sfi run", show_header=False, title_justify="left")
            for key, value in rows:
                table.add_row(key, value)
            self.console.print(table)
        else:  # the model was named when it loaded; one line each, prefixed once
            for key, value in rows[1:]:
                print(f"sfi: {key}: {value}", file=self.console.file, flush=True)


def _sfi_line(s: RunSummary) -> str:
    steps = s.slow_steps + s.fast_steps
    if not steps:
        return "-"
    read = s.kv_bytes_read / max(s.kv_bytes_dense, 1)
    line = (f"{s.slow_steps:,} slow / {s.fast_steps:,} fast steps; SFI engaged on {s.sparse_jobs} of "
            f"{s.succeeded} job(s) (the others fit the budget); KV read {read:.1%} of dense")
    speedups = [c["speedup"] for c in s.compared if c.get("speedup")]
    if s.compared:
        same = sum(c["identical"] for c in s.compared)
        agree = sum(c["token_agreement"] for c in s.compared) / len(s.compared)
        line += f"; vs dense: {same}/{len(s.compared)} identical, agreement {agree:.1%}"
        if speedups:
            line += f", decode speedup {statistics.median(speedups):.2f}x (median of the {len(speedups)} engaged)"
    return line


def _eval_cell(r: dict) -> str:
    """correct/trials (with dense's 95% interval on dense's own row); an NLL with its change against dense."""
    if "correct" in r:
        text = f"{r['correct']}/{r['trials']}"
        if r["recipe"] == "dense":
            lo, hi = r["ci95"]
            text += f" [{lo * r['trials']:.0f}-{hi * r['trials']:.0f}]"
        elif r.get("within_dense_ci") is False:
            text += " *"
        return text
    text = f"{r['nll']:.3f}"
    if r.get("nll_vs_dense") is not None:
        ci = r.get("nll_vs_dense_ci")
        text += f" {r['nll_vs_dense']:+.1%}" + (f"±{ci:.1%}" if ci is not None else "")
    if r["task"] == "fidelity":
        text += f"\nagree {r['agreement']:.0%}, top-1 {r['top1']:.0%}"
    return text


def _mean_pct(rows, key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{sum(values) / len(values):.1%}" if values else "-"


def eval_table(rows: list[dict], console: Console) -> None:
    """Recipes down, task@length across, then the cost columns and the recall diagnostic. Retrieval: correct/trials
    (dense's row shows its 95% interval; * marks a count outside it); nll and fidelity: the mean NLL and its
    change against dense with a paired 95% interval."""
    columns = sorted({(r["task"], r["length"]) for r in rows}, key=lambda c: (c[0], c[1]))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    table = Table(title="sfi eval", title_justify="left")
    table.add_column("recipe")
    for task, length in columns:
        table.add_column(f"{task}\n{length}", justify="right")
    for name in ("attended", "slow", "recall"):
        table.add_column(name, justify="right")
    for recipe in recipes:
        mine = {(r["task"], r["length"]): r for r in rows if r["recipe"] == recipe}
        table.add_row(recipe, *(_eval_cell(mine[key]) if key in mine else "-" for key in columns),
                      *(_mean_pct(mine.values(), key) for key in ("attended_fraction", "slow_fraction", "recall")))
    console.print(table)


def workload_table(result: dict, console: Console) -> None:
    table = Table(title=f"sfi bench --workload {result['workload']}: {result['model']} on {result['device']} "
                        f"({result['note']})", title_justify="left")
    for name in ("run", "jobs/hour", "prompt tok/s", "completion tok/s", "load s", "prefill s", "decode s",
                 "of it captures", "rows/step", "other s", "prefill reused", "KV read"):
        table.add_column(name, justify="right")
    for r in result["runs"]:
        reused = r["prefill_tokens_reused"] / max(r["prefill_tokens_reused"] + r["prefill_tokens_computed"], 1)
        table.add_row(r["name"], f"{r['jobs_per_hour']:,.0f}", f"{r['prompt_tok_s']:,.1f}",
                      f"{r['completion_tok_s']:,.1f}", f"{r['load_s']:.1f}", f"{r['prefill_s']:.1f}",
                      f"{r['decode_s']:.1f}", f"{r['capture_s']:.1f} ({r['graph_captures']})",
                      f"{r['mean_rows_per_step']:.1f}" if r["mean_rows_per_step"] else "-", f"{r['idle_s']:.1f}",
                      f"{reused:.0%}", f"{r['kv_read_fraction']:.0%}" if r["kv_read_fraction"] is not None else "-")
    console.print(table)
    for name, value in result["ratios"].items():
        console.print(f"{name}: {value:.2f}x", markup=False, highlight=False)


def bench_table(result: dict, console: Console) -> None:
    table = Table(title=f"sfi bench: {result['preset']}, {result['dtype']}, {result['device']}, copy bandwidth "
                        f"{result['copy_bandwidth_GBps']:.0f} GB/s", title_justify="left")
    names = ("ctx x batch", "sfi tok/s", "dense tok/s", "torch tok/s", "hf tok/s", "sfi/dense", "sfi/torch",
             "sfi/best dense", "sfi/hf", "sfi % roof", "dense % roof", "torch % roof", "slow", "attended")
    for name in names:
        table.add_column(name, justify="right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in result["runs"]:
        if "error" in r:
            table.add_row(f"{r['ctx']} x {r['batch']}", r["error"], *[""] * (len(names) - 2))
            continue
        sfi, dense, plain, hf = r["sfi"], r["dense"], r.get("torch", {}), r.get("hf_generate", {})
        over_plain = sfi["tok_s"] / plain["tok_s"] if plain.get("tok_s") else None
        table.add_row(f"{r['ctx']} x {r['batch']}", fmt(sfi["tok_s"], ",.1f"), fmt(dense["tok_s"], ",.1f"),
                      fmt(plain.get("tok_s"), ",.1f"), fmt(hf.get("tok_s"), ",.1f"), fmt(r["sfi_over_dense"], ".2f"),
                      fmt(over_plain, ".2f"), fmt(r.get("sfi_over_best_dense"), ".2f"),
                      fmt(r.get("sfi_over_hf"), ".1f"), fmt(sfi.get("pct_roofline"), ".0f"),
                      fmt(dense.get("pct_roofline"), ".0f"), fmt(plain.get("pct_roofline"), ".0f"),
                      fmt(sfi["slow_fraction"], ".1%"), fmt(sfi.get("attended_fraction"), ".1%"))
    console.print(table)


def append_csv(path: Path, result: dict) -> None:
    """One line per configuration, appended (a header first when the file is new)."""
    import csv

    fields = ["device", "preset", "ctx", "batch", "new_tokens", "sfi_tok_s", "dense_tok_s", "hf_tok_s",
              "sfi_over_dense", "sfi_pct_roofline", "dense_pct_roofline", "slow_fraction", "copy_bandwidth_GBps",
              "torch_tok_s", "sfi_over_best_dense"]
    new = not path.exists() or path.stat().st_size == 0
    if not new:  # an older file keeps its own columns: its lines stay aligned with its header
        with path.open(newline="") as f:
            fields = next(csv.reader(f), fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in result["runs"]:
            if "error" in r:
                continue
            writer.writerow({
                "device": result["device"], "preset": result["preset"], "ctx": r["ctx"], "batch": r["batch"],
                "new_tokens": result["new_tokens"], "sfi_tok_s": round(r["sfi"]["tok_s"], 2),
                "dense_tok_s": round(r["dense"]["tok_s"], 2),
                "hf_tok_s": round(r["hf_generate"]["tok_s"], 2) if "tok_s" in r.get("hf_generate", {}) else "",
                "sfi_over_dense": round(r["sfi_over_dense"], 3),
                "sfi_pct_roofline": round(r["sfi"].get("pct_roofline", 0), 1),
                "dense_pct_roofline": round(r["dense"].get("pct_roofline", 0), 1),
                "slow_fraction": round(r["sfi"]["slow_fraction"], 4),
                "copy_bandwidth_GBps": round(result["copy_bandwidth_GBps"], 1),
                "torch_tok_s": round(r["torch"]["tok_s"], 2) if "torch" in r else "",
                "sfi_over_best_dense": round(r["sfi_over_best_dense"], 3) if "sfi_over_best_dense" in r else ""})


def write_json(path: Path | str, data: dict) -> None:
    """A JSON file, written whole or not at all (a stream such as - or /dev/stdout as is)."""
    write_whole(str(path), (json.dumps(data, indent=2) + "\n").encode())


def write_report(path: Path, summary: RunSummary) -> None:
    """The JSON report, written whole or not at all."""
    data = {
        "model": summary.model, "device": summary.device, "exit_code": summary.exit_code,
        "jobs": {"total": summary.jobs_total, "succeeded": summary.succeeded, "failed": summary.failed,
                 "skipped": summary.skipped, "invalid_lines": summary.invalid_lines},
        "tokens": {"prompt": summary.prompt_tokens, "completion": summary.completion_tokens},
        "timing": {"load_s": round(summary.load_s, 3), "prefill_s": round(summary.prefill_s, 3),
                   "decode_s": round(summary.decode_s, 3), "decode_steps": summary.decode_steps,
                   "graph_captures": summary.graph_captures, "capture_s": round(summary.capture_s, 3),
                   "capture_warmup_s": round(summary.capture_warmup_s, 3),
                   "capture_record_s": round(summary.capture_record_s, 3),
                   "oom_retries": summary.oom_retries,
                   "compare_s": round(summary.compare_s, 3),
                   "idle_s": round(summary.idle_s, 3),
                   "elapsed_s": round(summary.elapsed_s, 3), "decode_tok_s": round(summary.decode_tok_s, 2),
                   "end_to_end_tok_s": round(summary.end_to_end_tok_s, 2),
                   "jobs_per_hour": round(summary.jobs_per_hour, 1), "workers": summary.workers},
        "prefill_tokens": {"computed": summary.prefill_tokens_computed, "reused": summary.prefill_tokens_reused},
        "interrupted": summary.interrupted, "config": summary.config, "results": summary.results,
        "sfi": {"budget": summary.budget, "slow_steps": summary.slow_steps, "fast_steps": summary.fast_steps,
                "kv_bytes_read": summary.kv_bytes_read, "kv_bytes_dense": summary.kv_bytes_dense},
    }
    write_json(path, data)
