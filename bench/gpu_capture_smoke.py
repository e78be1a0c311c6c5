"""A quick check of the decode step's CUDA-graph captures on a GPU: `sfi run` on a tiny random Qwen3 checkpoint
(written here, 4k context) with SFI engaged, continuous batching over the pooled cache, then prints the report's
timing (graph captures and where their time went) and whether every job finished.

    PYTHONPATH=.:tests python3 bench/gpu_capture_smoke.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sfi_cli.main import main as sfi

import tiny

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
ckpt = tiny.make_checkpoint(out / "ckpt", "qwen3", max_position_embeddings=4096, num_key_value_heads=4)
text = tiny.TEXT * 12
jobs = [{"id": f"j{i}", "prompt": text[i * 50: i * 50 + 600 + 700 * (i % 4)], "max_new_tokens": 40 + 30 * (i % 3)}
        for i in range(10)]
(out / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
rc = sfi(["run", str(out / "jobs.jsonl"), "-m", str(ckpt), "-o", str(out / "out.jsonl"), "--overwrite", "-q",
          "--report", str(out / "report.json"), "--set", "decode.max_batch_size=4", "--set", "decode.prefill_chunk=256",
          "--set", "generation.ignore_eos=true"])
report = json.loads((out / "report.json").read_text())
print(json.dumps({"rc": rc, "device": report["device"], "jobs": report["jobs"], "timing": report["timing"],
                  "sfi": report["sfi"]}, indent=1))
