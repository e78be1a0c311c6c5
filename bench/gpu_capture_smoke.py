"""A quick check of the decode step's CUDA-graph captures on a GPU: `sfi run` on a tiny random Qwen3 checkpoint
(written here, 4k context) with SFI engaged, continuous batching over the pooled cache, twice in one process, with
Triton's cache in a fresh folder. Prints each capture (its shape, warm-up and record seconds, from the step's debug
log), the Triton kernels compiled by each run, the report's timing and whether every job finished. The second run
finds every kernel compiled: what its captures still cost is the capture itself.

    PYTHONPATH=.:tests python3 bench/gpu_capture_smoke.py OUT_DIR [MODEL_DIR]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sfi-triton-")  # before triton is imported

from sfi_cli.main import main as sfi  # noqa: E402

import tiny  # noqa: E402


class _Captures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def compiled() -> list[str]:
    return sorted(p.stem for p in Path(os.environ["TRITON_CACHE_DIR"]).rglob("*.cubin"))


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
if len(sys.argv) > 2:
    ckpt, text, sizes = Path(sys.argv[2]), (Path(__file__).parent.parent / "README.md").read_text() * 40, (6000, 9000)
else:
    ckpt = tiny.make_checkpoint(out / "ckpt", "qwen3", max_position_embeddings=4096, num_key_value_heads=4)
    text, sizes = tiny.TEXT * 12, (600, 700)
jobs = [{"id": f"j{i}", "prompt": text[i * 50: i * 50 + sizes[0] + sizes[1] * (i % 4)],
         "max_new_tokens": 40 + 30 * (i % 3)} for i in range(10)]
(out / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
handler = _Captures()
step_log = logging.getLogger("sfi.engine.step")
step_log.setLevel(logging.DEBUG)
step_log.addHandler(handler)
runs = []
for _ in range(2):
    before, handler.lines = compiled(), []
    rc = sfi(["run", str(out / "jobs.jsonl"), "-m", str(ckpt), "-o", str(out / "out.jsonl"), "--overwrite", "-q",
              "--report", str(out / "report.json"), "--set", "decode.max_batch_size=4",
              "--set", "decode.prefill_chunk=256", "--set", "generation.ignore_eos=true"])
    report = json.loads((out / "report.json").read_text())
    after = compiled()
    variants = {name: after.count(name) - before.count(name) for name in sorted(set(after))}
    runs.append({"rc": rc, "kernels_compiled": len(after) - len(before),
                 "variants": {k: v for k, v in variants.items() if v}, "captures": handler.lines,
                 "jobs": report["jobs"], "timing": report["timing"]})
    print(json.dumps(runs[-1], indent=1), flush=True)
print(json.dumps({"device": report["device"], "sfi": report["sfi"]}, indent=1))
