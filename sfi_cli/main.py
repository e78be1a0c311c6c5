"""The `sfi` command: parse options, resolve the config, call the library, render with rich.

Exit codes: 0 every job succeeded; 1 usage or configuration error; 2 some jobs failed; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from sfi.config import available_recipes, load_config, recipes_dir, with_generation
from sfi.errors import ConfigError, SfiError

from .options import Compare, Device, Dtype, Model, OutputFormat, Quiet, Recipe, Report, Set, Truncate
from .render import Reporter, write_report

try:  # typer >= 0.2x vendors click; its usage errors derive from TyperException
    from typer import TyperException as UsageError
except ImportError:  # older typer runs on click itself
    from click import ClickException as UsageError

# rich_markup_mode None: help texts are shown as written ("[default: 256]", "sfi[plot]" are not markup).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Batch long-context LLM decoding with Slow-Fast Inference.")


@app.command("run")
def run_command(
    jobs: Annotated[str, typer.Argument(help="JSONL jobs file, or - for stdin.")],
    model: Model = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Results JSONL (default: stdout). "
                      "Re-running with the same path resumes.", show_default=False)] = None,
    output_format: Annotated[OutputFormat, typer.Option(help="sfi lines, or OpenAI Batch API output lines.")]
    = OutputFormat.sfi,
    recipe: Recipe = "default",
    set_: Set = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Default for jobs without their own "
                              "[default: 256].", show_default=False)] = None,
    max_new_tokens_cap: Annotated[int | None, typer.Option(min=1, help="Upper bound for every job, its own "
                                  "max_new_tokens included [default: none].", show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Default sampling temperature; 0 = greedy "
                           "[default: 0].", show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option(help="Default nucleus mass [default: 1].", show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="Default top-k; 0 = off [default: 0].",
                                              show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed; jobs without a seed derive theirs from it and their "
                                             "id [default: 0].", show_default=False)] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Default stop string (repeatable).",
                                                   show_default=False)] = None,
    device: Device = None,
    dtype: Dtype = None,
    truncate: Annotated[Truncate | None, typer.Option(help="Cut prompts longer than the context instead of "
                        "failing them: keep the end (left) or both ends (middle).", show_default=False)] = None,
    compare: Annotated[Compare | None, typer.Option(help="Also decode every job with the dense recipe and add the "
                       "measured speedup and token agreement to its line.", show_default=False)] = None,
    strict: Annotated[bool, typer.Option(help="Abort before loading the model if any line is bad.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start the output over instead of resuming.")] = False,
    report: Report = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes on the CPU, each with its own model "
                       "copy and its share of the jobs; the output is written by this process alone (without it: "
                       "one process decodes).", show_default=False)] = None,
    gpus: Annotated[str | None, typer.Option(help="One worker per GPU: all, a count (2), or indices (0,1).",
                                             show_default=False)] = None,
    max_retries: Annotated[int, typer.Option(min=0, help="Times a job is decoded again after its worker died "
                                             "(killed, out of memory) before it is reported as failed.")] = 2,
    ray: Annotated[str | None, typer.Option("--ray", metavar="[ADDRESS]", help="Decode on a Ray cluster, one actor "
                   "per GPU (or --workers CPU actors): --ray alone starts a local Ray instance; ADDRESS is auto, "
                   "HOST:PORT or ray://HOST:PORT. Needs pip install 'sfi[ray]'.", show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Decode every job of a JSONL file and write one result line per job."""
    from sfi.engine import Runner, RunOptions
    from sfi.results import check_writable

    check_writable(str(report) if report is not None else None)  # before the run, not after every job

    overrides = list(set_ or [])
    overrides += [f"decode.{k}={v}" for k, v in (("device", device), ("dtype", dtype)) if v is not None]
    config = with_generation(load_config(recipe, overrides), max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop=list(stop) if stop else None,
                             max_new_tokens_cap=max_new_tokens_cap)
    reporter = Reporter(quiet)
    opts = RunOptions(jobs=jobs, output=output, output_format=output_format.value, model=model, config=config,
                      strict=strict, truncate=truncate.value if truncate else None, overwrite=overwrite,
                      compare_dense=compare is not None)
    try:
        if gpus is not None or workers is not None or ray is not None:
            summary = _run_workers(opts, reporter, workers, gpus, max_retries, ray)
        else:
            summary = Runner(opts, reporter).run()
    finally:
        reporter.close()
    reporter.summary(summary)
    if report is not None:
        write_report(report, summary)
    raise typer.Exit(summary.exit_code)


def _run_workers(opts, reporter, workers: int | None, gpus: str | None, max_retries: int, ray: str | None):
    from sfi.engine.workers import gpu_devices, run_workers, visible_gpus

    devices = None
    if gpus is not None:
        if workers is not None or ray is not None:
            raise typer.BadParameter("--gpus takes neither --workers nor --ray (a Ray cluster gets one actor per "
                                     "GPU)", param_hint="--gpus")
        devices = gpu_devices(gpus, visible_gpus())
    return run_workers(opts, reporter, workers or 1, devices, max_retries, ray)


_RAY_ADDRESS = re.compile(r"^(auto|local|[a-z][a-z0-9+.-]*://\S+|[A-Za-z0-9.-]+:\d+)$")


def _ray_default(argv: list[str]) -> list[str]:
    """`--ray` takes an optional value: alone (last, or before another option or the jobs file) it means
    "local", a Ray instance of the run's own."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and not (i + 1 < len(argv) and _RAY_ADDRESS.match(argv[i + 1])):
            out.append("local")
    return out


@app.command("eval")
def eval_command(
    model: Model = None,
    recipe: Annotated[list[str] | None, typer.Option("--recipe", "-r", help="Recipe to compare, repeatable; "
                      "NAME or NAME:section.key=value,... for an ablation [default: dense and default].",
                      show_default=False)] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated: passkey, multikey, vartrack, preamble, nll (with the "
                                            "recall diagnostic), fidelity.")]
    = "passkey,multikey,vartrack,preamble,nll",
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens; 2k = 2048.")] = "2k,4k",
    trials: Annotated[int, typer.Option(min=1, help="Trials per task and length.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the generated tasks.")] = 0,
    batch: Annotated[int, typer.Option(min=1, help="Trials decoded together.")] = 4,
    device: Device = None,
    dtype: Dtype = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.",
                                                  show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Measure recipes side by side on generated long-context tasks (offline, seeded)."""
    from sfi.loader import load_model
    from sfi.results import check_writable
    from sfi.tools.eval import TASKS, compare_to_dense, corpus_id, evaluate, parse_lengths

    from .render import eval_table, write_json

    check_writable(str(json_out) if json_out is not None else None)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in task_list if t not in TASKS]
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}",
                                 param_hint="--tasks")
    reporter = Reporter(quiet)
    lm = load_model(model, device or "auto", dtype or "auto", progress=reporter.message)
    reporter.message(f"model {lm.name} on {lm.model.device}, loaded in {lm.load_s:.1f}s")

    def summarise(cells: list) -> list[dict]:
        rows = [c.summary() for c in cells]
        compare_to_dense(rows)
        return rows

    def save(cells: list) -> None:
        if json_out is not None:
            write_json(json_out, {"model": lm.name, "device": str(lm.model.device),
                                  "dtype": str(lm.model.dtype).removeprefix("torch."), "trials": trials, "seed": seed,
                                  "corpus": corpus_id(), "cells": summarise(cells)})

    cells = evaluate(lm, recipe or ["dense", "default"], task_list, parse_lengths(lengths), trials, seed=seed,
                     batch=batch, progress=reporter.message, checkpoint=save)
    save(cells)
    if not quiet:
        eval_table(summarise(cells), reporter.console)


def _contexts(text: str) -> list[int]:
    try:
        return [int(float(p.strip().lower().rstrip("k")) * (1024 if p.strip().lower().endswith("k") else 1))
                for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use a comma-separated list like 8k,32k,128k") from None


@app.command("bench")
def bench_command(
    ctx: Annotated[str, typer.Option(help="Context lengths, e.g. 8k,32k,128k (k = 1024).")] = "8k",
    batch: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,4.")] = "1",
    preset: Annotated[str, typer.Option(help="Built-in architecture with seeded random weights "
                                              "(qwen3-4b, qwen3-tiny).")] = "qwen3-4b",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Bench a real checkpoint (any `sfi run "
                                              "--model` form) instead of a preset's random weights.",
                                              show_default=False)] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Use the preset's seeded random "
                                                 "weights (the default without --model).")] = False,
    new_tokens: Annotated[int, typer.Option(min=8, help="Tokens decoded per row.")] = 256,
    recipe: Recipe = "default",
    set_: Set = None,
    hf: Annotated[bool, typer.Option(help="Also time transformers.generate (SDPA).")] = True,
    plain: Annotated[bool, typer.Option("--torch/--no-torch", help="Also time a plain-PyTorch dense decoder (static "
                                        "cache, SDPA, one CUDA graph per step, nothing fused), same weights; "
                                        "ratios are quoted against the faster of it and our dense.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full results as JSON.",
                                                  show_default=False)] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Append one line per configuration.",
                                                 show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw tok/s against context as a PNG (sfi[plot]).",
                                              show_default=False)] = None,
    write_checkpoint: Annotated[Path | None, typer.Option(help="Instead: write the preset with random bf16 weights "
                                                          "and the real Qwen3 tokenizer as a checkpoint folder "
                                                          "(for --workload with -m).", show_default=False)] = None,
    workload: Annotated[str | None, typer.Option(help="Instead: `sfi run` end to end on a job file (or `mix`, the "
                                                 "built-in one) with the recipe and dense, continuous and static "
                                                 "batches: jobs/hour, tokens/s, where the time went.",
                                                 show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Decode throughput of SFI against dense decoding, transformers.generate and the bandwidth limit."""
    from sfi.tools.bench import PRESETS, run_bench

    from .render import append_csv, bench_table, workload_table, write_json

    if write_checkpoint is not None:
        import torch

        from sfi.qwen3_tokenizer import qwen3_tokenizer_dir
        from sfi.tools.bench import write_checkpoint as write

        if preset not in PRESETS:
            raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}",
                                     param_hint="--preset")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        typer.echo(write(preset, write_checkpoint, qwen3_tokenizer_dir(), device))
        return
    if workload is not None:
        import tempfile

        from sfi.results import check_writable
        from sfi.tools.workload import run_workload, workload_file

        check_writable(str(json_out) if json_out is not None else None)
        reporter = Reporter(quiet)
        with tempfile.TemporaryDirectory(prefix="sfi-mix-") as tmp:
            jobs = workload_file(workload, model, Path(tmp))
            result = run_workload(jobs, model, (recipe, "dense"), overrides=list(set_ or []),
                                  progress=reporter.message)
        if json_out is not None:
            write_json(json_out, result)
        if not quiet:
            workload_table(result, reporter.console)
        return

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", param_hint="--preset")
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"{batch!r}: use a comma-separated list like 1,4", param_hint="--batch") from None
    from sfi.results import check_writable

    for path in (json_out, csv_out, plot):
        check_writable(str(path) if path is not None else None)
    reporter = Reporter(quiet)
    config = load_config(recipe, list(set_ or []))
    if model is not None and random_weights:
        raise typer.BadParameter("--model and --random-weights exclude each other", param_hint="--model")
    result = run_bench(preset, _contexts(ctx), batches, new_tokens, config.sfi, hf=hf, plain=plain,
                       progress=reporter.message,
                       cuda_graphs=config.decode.cuda_graphs, model_spec=model)
    if json_out is not None:
        write_json(json_out, result)
    if csv_out is not None:
        append_csv(csv_out, result)
    if plot is not None:
        from sfi.plot import plot_bench

        plot_bench([result], plot)
    if not quiet:
        bench_table(result, reporter.console)


@app.command("plot")
def plot_command(
    results: Annotated[list[Path], typer.Argument(help="JSON files written by `sfi bench --json`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("bench.png"),
) -> None:
    """Draw saved `sfi bench` results (several files are merged) as a PNG."""
    from sfi.plot import plot_bench

    loaded = []
    for path in results:
        try:
            loaded.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable sfi bench JSON file ({exc})") from None
        if not isinstance(loaded[-1], dict) or "runs" not in loaded[-1]:
            raise ConfigError(f"{path}: not an sfi bench result (no 'runs')")
    plot_bench(loaded, output)


@app.command("recipes")
def recipes_command() -> None:
    """List the shipped recipes."""
    names = available_recipes()
    width = max(map(len, names), default=0)
    for name in names:
        typer.echo(f"{name:<{width}}  {load_config(name).description}")
    typer.echo(f"(in {recipes_dir()})")


def _terminate(signum: int, frame: object) -> None:
    # cron and batch schedulers stop jobs with SIGTERM: finish the current line and exit like Ctrl-C.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    argv = _ray_default(list(sys.argv[1:] if argv is None else argv))
    try:
        # Not standalone: click would map usage errors to its own exit code 2, which means "jobs failed" here.
        code = command.main(args=argv, prog_name="sfi", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except UsageError as e:  # click's own code for these is 2, which means "jobs failed" here
        e.show()
        return 1
    except (typer.Abort, KeyboardInterrupt):
        print("sfi: interrupted", file=sys.stderr)
        return 130
    except SfiError as e:
        print(f"sfi: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader of our output went away (`sfi run ... | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # an I/O error is a message with the path, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"sfi: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
