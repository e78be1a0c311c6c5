"""Decode steps of the built-in mix under each admission order (`decode.order`), through the real engine on the CPU:
a tiny Qwen3-shaped checkpoint with the real Qwen3 tokenizer, so the jobs have the mix's token counts; dense
decoding, end-of-sequence ignored. The step count and rows per step are the scheduler's, whatever the hardware
(the H200 run of the same mix in length order took 1,819 steps at 19.9 rows).

    PYTHONPATH=. python3 bench/order_steps.py OUT.json [KV_MEMORY_FRACTION]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from sfi.config import load_config
from sfi.engine import RunOptions, run
from sfi.loader import load_tokenizer
from sfi.qwen3_tokenizer import qwen3_tokenizer_dir
from sfi.tools.bench import write_checkpoint
from sfi.tools.workload import mix_jobs, write_jobs


def main() -> None:
    out = Path(sys.argv[1])
    fraction = sys.argv[2] if len(sys.argv) > 2 else "0.3"
    tmp = Path(tempfile.mkdtemp(prefix="sfi-order-"))
    model = write_checkpoint("qwen3-tiny", tmp / "ckpt", qwen3_tokenizer_dir(), hidden_size=32, intermediate_size=64,
                             head_dim=8, num_hidden_layers=1, max_position_embeddings=40960)
    jobs = tmp / "mix.jsonl"
    write_jobs(jobs, mix_jobs(load_tokenizer(str(model))))
    result = {"kv_memory_fraction": fraction, "runs": []}
    for order in ("length", "output"):
        config = load_config("dense", ["generation.ignore_eos=true", f"decode.order={order}",
                                       f"decode.kv_memory_fraction={fraction}"])
        started = time.perf_counter()
        s = run(RunOptions(jobs=str(jobs), output=str(tmp / f"{order}.jsonl"), model=str(model), config=config,
                           overwrite=True))
        row = {"order": order, "jobs": s.succeeded, "failed": s.failed, "decode_steps": s.decode_steps,
               "rows_per_step": round(s.completion_tokens / max(s.decode_steps, 1), 2),
               "completion_tokens": s.completion_tokens, "wall_s": round(time.perf_counter() - started, 1)}
        result["runs"].append(row)
        print(row, flush=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
