"""Host time per decode step: what `Decoder.step` spends outside the model's forward (the runtime's bookkeeping,
the step's staging, sampling, stop checks), on a CPU with a two-layer model so that the forward is small.

    PYTHONPATH=.:tests python3 bench/host_step.py [ROWS]

On a GPU this work is serial with the step's graph: the next step cannot be enqueued before it is done (the
decode-at-the-bandwidth-limit issue's "host round trip").
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from sfi.config import SfiConfig
from sfi.engine.decoder import Decoder, Request
from sfi.loader import load_model
from sfi.method.boundary import FixedPeriod
from sfi.method.runtime import SfiRuntime
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker

import tiny


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    folder = Path(tempfile.mkdtemp(prefix="sfi-host-step-"))
    tiny.make_checkpoint(folder, "qwen3", num_key_value_heads=2, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, head_dim=8)
    lm = load_model(str(folder), device="cpu")
    torch.set_num_threads(1)
    ids = tiny.tokenizer()(tiny.TEXT * 8)["input_ids"]
    forward = [0.0]
    decode = lm.model.decode

    def timed(*args):
        started = time.perf_counter()
        out = decode(*args)
        forward[0] += time.perf_counter() - started
        return out

    lm.model.decode = timed
    best = None
    for _ in range(5):
        runtime = SfiRuntime(SfiConfig(sink=4, k_head=32, recent=16), FixedPeriod(16), rows,
                             lm.args.kv_bytes_per_token(lm.model.dtype))
        decoder = Decoder(lm.model, rows, 700, runtime, prefill_chunk=64)
        for i in range(rows):
            decoder.admit(i, Request(ids[i * 3: i * 3 + 300], RowSampler(SamplingParams(), i),
                                     StopChecker(lm.tokenizer, (), (), 300)))
        decoder.prefill()
        forward[0], steps, started = 0.0, 0, time.perf_counter()
        while decoder.step() is not None:
            steps += 1
        total = time.perf_counter() - started
        host = (total - forward[0]) / steps * 1e6
        best = host if best is None else min(best, host)
    print(f"{rows} rows: host {best:.0f} us per step (best of 5 runs of {steps} steps)")


if __name__ == "__main__":
    main()
