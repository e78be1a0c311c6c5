"""The engine's continuous batching and shared prefixes, end to end through `sfi run` on a tiny checkpoint:
no job's tokens depend on when it was admitted, on its neighbours, or on whether its prefix was copied."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from sfi.config import SfiConfig
from sfi.engine.decoder import Decoder, Request
from sfi.engine.scheduler import Sized, plan_buckets, plan_pool, prefix_groups
from sfi.loader import load_model
from sfi.method.boundary import FixedPeriod
from sfi.method.runtime import SfiRuntime
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker
from sfi_cli.main import main

import tiny

TEXT = tiny.TEXT * 3
# Different lengths, outputs and samplers: rows finish at different steps, so slots are refilled mid-run.
JOBS = [{"id": f"j{i}", "prompt": TEXT[i * 37: i * 37 + 60 + 50 * (i % 4)], "max_new_tokens": 6 + 7 * (i % 3)}
        | ({"temperature": 0.8, "seed": i} if i % 2 else {}) for i in range(7)]
DOC = TEXT[:700]
QUESTIONS = [{"id": f"q{i}", "prompt": DOC + f" Question {i}: what is {w}?", "max_new_tokens": 8}
             for i, w in enumerate(("the fox", "a journey", "the passkey", "Ishmael"))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny.make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3", num_key_value_heads=4))


def _run(ckpt, tmp_path, jobs, name, *argv):
    path = tmp_path / f"{name}.jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / f"{name}.jsonl"
    assert main(["run", str(path), "-m", ckpt, "-o", str(out), "-q", *argv]) == 0
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def _texts(results):
    return {k: (v["text"], v["completion_tokens"]) for k, v in results.items()}


@pytest.mark.parametrize("recipe", ["dense", "tiny"])
def test_continuous_batching_equals_decoding_each_job_alone(ckpt, tmp_path, recipe):
    """Two slots for seven jobs, prompts prefilled 16 tokens per decode step: the same tokens as one job at a
    time, for dense and for SFI (whose state a refilled slot must not inherit)."""
    sfi = ["--set", "sfi.k_head=16", "--set", "sfi.recent=8"] if recipe == "tiny" else []
    alone = _run(ckpt, tmp_path, JOBS, "alone", "-r", recipe, *sfi, "--set", "decode.max_batch_size=1")
    both = _run(ckpt, tmp_path, JOBS, "both", "-r", recipe, *sfi, "--set", "decode.max_batch_size=2",
                "--set", "decode.prefill_chunk=16")
    static = _run(ckpt, tmp_path, JOBS, "static", "-r", recipe, *sfi, "--set", "decode.max_batch_size=2",
                  "--set", "decode.continuous=false")
    assert _texts(both) == _texts(alone) == _texts(static)
    if recipe == "tiny":
        assert sum(r["sfi"]["sparse"] for r in both.values()) >= 3


@pytest.mark.parametrize("recipe", ["dense", "tiny"])
def test_a_tight_pool_reuses_room_and_changes_no_tokens(ckpt, tmp_path, monkeypatch, recipe):
    """A pool with room for about one and a half of the longest job: jobs wait for room, shorter ones fill the gaps
    meanwhile, segments are reused at other offsets; every job's tokens are still those of the job alone."""
    from sfi.cache import KVCache
    from sfi.engine import scheduler

    sfi = ["--set", "sfi.k_head=16", "--set", "sfi.recent=8"] if recipe == "tiny" else []
    alone = _run(ckpt, tmp_path, JOBS, "alone", "-r", recipe, *sfi, "--set", "decode.max_batch_size=1")
    plan = scheduler.plan_pool

    def tight(*args, **kwargs):
        bucket, too_big = plan(*args, **kwargs)
        bucket.pool = bucket.max_tokens * 3 // 2
        return bucket, too_big

    placed, held = [], {}
    place, release = KVCache.place, KVCache.release

    def record(self, slot, n):
        place(self, slot, n)
        held[slot] = n
        placed.append((self.base[slot], n, sum(held.values())))

    monkeypatch.setattr(scheduler, "plan_pool", tight)
    monkeypatch.setattr(KVCache, "place", record)
    monkeypatch.setattr(KVCache, "release", lambda self, slot: (held.pop(slot, None), release(self, slot)))
    pooled = _run(ckpt, tmp_path, JOBS, "pooled", "-r", recipe, *sfi, "--set", "decode.max_batch_size=4",
                  "--set", "decode.prefill_chunk=16")
    assert _texts(pooled) == _texts(alone)
    longest = max(n for _, n, _ in placed)
    assert len(placed) == len(JOBS) and max(total for *_, total in placed) <= longest * 3 // 2
    assert len({base for base, _, _ in placed}) >= 3  # room given back went to later jobs elsewhere in the pool


def test_shared_prefixes_are_prefilled_once_with_identical_outputs(ckpt, tmp_path):
    plain = _run(ckpt, tmp_path, QUESTIONS, "plain", "--set", "decode.prefix_min_tokens=0")
    shared = _run(ckpt, tmp_path, QUESTIONS, "shared", "--set", "decode.prefix_min_tokens=32")
    assert _texts(shared) == _texts(plain)
    tok = tiny.tokenizer()
    ids = [tok(q["prompt"])["input_ids"] for q in QUESTIONS]
    common = min(next(i for i, (a, b) in enumerate(zip(x, ids[0], strict=False)) if a != b) for x in ids[1:])
    # One job computes the prefix; the other three copy it, short of their own last 16 (the bootstrap window).
    copied = [r for r in shared.values() if r["prefill_tokens_reused"]]
    assert len(copied) == 3 and all(r["prefill_tokens_reused"] == min(common, r["prompt_tokens"] - 16) for r in copied)
    for r in shared.values():
        assert r["prefill_tokens_computed"] + r["prefill_tokens_reused"] == r["prompt_tokens"]
    assert all(r["prefill_tokens_reused"] == 0 for r in plain.values())
    # Static batches, the document longer than a chunk: its prefill is one call for the whole prompt (layer by layer
    # on a GPU), after which the followers copy it, as they do from a prefill chunk by chunk.
    static = _run(ckpt, tmp_path, QUESTIONS, "static", "--set", "decode.prefix_min_tokens=32",
                  "--set", "decode.continuous=false", "--set", "decode.prefill_chunk=64")
    assert _texts(static) == _texts(plain)
    assert sorted(r["prefill_tokens_reused"] for r in static.values()) == \
        sorted(r["prefill_tokens_reused"] for r in shared.values())


def test_transcripts_that_extend_each_other_prefill_their_suffixes_in_aligned_chunks(ckpt, tmp_path):
    """Each transcript extends the one before by more than a chunk: the followers copy the prefix and prefill their
    own long suffix in chunks, the first running to the next chunk boundary; outputs equal to no reuse at all."""
    jobs = [{"id": f"t{i}", "prompt": TEXT[:300 + 170 * i], "max_new_tokens": 6} for i in range(3)]
    plain = _run(ckpt, tmp_path, jobs, "plain-t", "--set", "decode.prefix_min_tokens=0",
                 "--set", "decode.prefill_chunk=32")
    shared = _run(ckpt, tmp_path, jobs, "shared-t", "--set", "decode.prefix_min_tokens=32",
                  "--set", "decode.prefill_chunk=32")
    assert _texts(shared) == _texts(plain)
    reused = sorted(r["prefill_tokens_reused"] for r in shared.values())
    assert reused[0] == 0 and all(n > 0 for n in reused[1:])
    assert all(r["prompt_tokens"] - r["prefill_tokens_reused"] > 32 for r in shared.values())  # suffixes of chunks


def test_last_chunks_share_one_forward(ckpt, tmp_path, monkeypatch):
    """Followers of a shared prefix (and short prompts) whose last chunks fit one chunk's tokens are prefilled in
    one forward, with the texts of a run that prefills each alone, SFI engaged."""
    from sfi.model import Transformer

    sfi = ("--set", "sfi.k_head=16", "--set", "sfi.recent=8", "--set", "decode.prefix_min_tokens=32")
    alone = _run(ckpt, tmp_path, QUESTIONS, "alone", *sfi, "--set", "decode.max_batch_size=1")
    widths = []
    prefill_rows = Transformer.prefill_rows
    monkeypatch.setattr(Transformer, "prefill_rows",
                        lambda self, tokens, *a, **k: widths.append(len(tokens)) or prefill_rows(self, tokens, *a, **k))
    together = _run(ckpt, tmp_path, QUESTIONS, "together", *sfi)
    assert max(widths) == 3  # the three followers' suffixes in one forward
    assert _texts(together) == _texts(alone)
    assert sum(r["sfi"]["sparse"] for r in together.values()) == len(QUESTIONS)


def test_a_refilled_slot_starts_clean(ckpt):
    """One slot, an SFI job that refreshed its memory, then another job: the second's tokens are those it
    gets in a fresh decoder."""
    lm = load_model(ckpt, device="cpu")
    cfg = SfiConfig(sink=4, k_head=16, recent=8)
    ids = tiny.tokenizer()(TEXT)["input_ids"]

    def request(n, offset):
        return Request(ids[offset:offset + n], RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), 12))

    def decode(decoder, req):
        decoder.admit(0, req)
        decoder.prefill()
        while decoder.step() is not None:
            pass
        return req.stopper.token_ids

    def fresh():
        rt = SfiRuntime(cfg, FixedPeriod(4), 1, lm.args.kv_bytes_per_token(lm.model.dtype))
        return Decoder(lm.model, 1, 400, rt), rt

    shared, rt = fresh()
    decode(shared, request(300, 0))
    assert rt.stats[0].slow > 1
    second = decode(shared, request(150, 40))
    assert rt.stats[0].slow_steps[0] == 0 and len(rt.stats[0].fractions) == 12  # its own stats only
    assert second == decode(fresh()[0], request(150, 40))


@pytest.mark.parametrize("pooled", [False, True])
def test_key_norms_are_written_beside_every_key(ckpt, pooled):
    """The cache's key norms (read by every refresh) match its keys at every position a row holds: prefill chunks,
    a prefix copied from another row, decode steps; rows side by side in a pool."""
    lm = load_model(ckpt, device="cpu")
    a = lm.args
    cfg = SfiConfig(sink=4, k_head=16, recent=8)
    ids = tiny.tokenizer()(TEXT)["input_ids"]
    rt = SfiRuntime(cfg, FixedPeriod(4), 2, a.kv_bytes_per_token(lm.model.dtype))
    cache = lm.model.new_pool(2, 700, 400) if pooled else None
    decoder = Decoder(lm.model, 2, 400, rt, prefill_chunk=64, cache=cache)
    cache = decoder.cache
    cache.kn.fill_(float("nan")) if not pooled else cache.pool_kn.fill_(float("nan"))
    reqs = [Request(ids[:300], RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), 10)),
            Request(ids[:250] + ids[260:300], RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), 10),
                    reuse=(0, 200))]
    for slot, req in enumerate(reqs):
        decoder.admit(slot, req)
    while decoder.prefills:
        decoder.prefill()
    for _ in range(8):
        decoder.step()
    assert decoder.rows[1].length > 290 and rt.stats[0].slow > 1
    for slot, row in decoder.rows.items():
        at = slice(cache.base[slot], cache.base[slot] + row.length)
        keys = cache.k[:, slot, :, at].float()
        torch.testing.assert_close(cache.kn[:, slot, :, at], keys.norm(dim=-1))


def test_padding_idle_slots_leaves_every_rows_tokens_unchanged(ckpt, monkeypatch):
    """With CUDA graphs every step runs all slots, idle ones as padding (sfi.engine.step): forced on here, the decoding
    rows' tokens are those of unpadded steps, through admissions, slow steps and finished rows."""
    lm = load_model(ckpt, device="cpu")
    cfg = SfiConfig(sink=4, k_head=16, recent=8)
    ids = tiny.tokenizer()(TEXT)["input_ids"]
    from sfi.engine.step import StaticDecoder

    outs: list[torch.Tensor] = []  # every model step's logits, padding rows included: the step's width
    returned: list[torch.Tensor] = []  # the decoding rows' logits, in their order
    decode, static_launch = lm.model.decode, StaticDecoder.launch
    monkeypatch.setattr(lm.model, "decode", lambda *a: outs.append(decode(*a).clone()) or outs[-1])
    monkeypatch.setattr(StaticDecoder, "launch",
                        lambda *a, **k: returned.append(static_launch(*a, **k).clone()) or returned[-1])

    def run(pad: bool) -> tuple[list[list[int]], list[int]]:
        rt = SfiRuntime(cfg, FixedPeriod(4), 4, lm.args.kv_bytes_per_token(lm.model.dtype))
        decoder = Decoder(lm.model, 4, 400, rt, prefill_chunk=32)  # prompts prefilled while others decode
        decoder.static.pad = pad
        reqs = [Request(ids[o:o + n], RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), m))
                for o, n, m in ((0, 200, 6), (5, 120, 14), (9, 260, 9), (3, 90, 12), (7, 150, 5))]
        queue, logits = list(reqs), []
        outs.clear()
        while queue or decoder.busy:
            for slot in decoder.free[:1]:  # one admission per step: the decoding count keeps changing
                if queue:
                    decoder.admit(slot, queue.pop(0))
            decoder.prefill(32)
            if decoder.step() is not None:
                logits.append(returned[-1])
        return [r.stopper.token_ids for r in reqs], logits, [len(o) for o in outs]

    padded, padded_logits, widths = run(True)
    plain, plain_logits, _ = run(False)
    rows = [len(x) for x in plain_logits]
    # Steps run 1, 2 or 4 rows wide: 3 decoding rows take one padding row.
    assert 3 in rows and widths == [{1: 1, 2: 2, 3: 4, 4: 4}[n] for n in rows]
    assert [len(t) for t in plain] == [6, 14, 9, 12, 5] and padded == plain
    for a, b in zip(padded_logits, plain_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefix_groups_and_buckets():
    prompts = [[1, 2, 3, 4, 5, 6], [9, 9], [1, 2, 3, 4, 7, 8, 9], [1, 2, 3, 0], [9, 9, 1]]
    groups, shared = prefix_groups(prompts, min_shared=2, keep=1)
    assert groups[0] == groups[2] == groups[3] >= 0 and groups[1] == groups[4] >= 0 and groups[0] != groups[1]
    assert shared == [3, 0, 3, 3, 2]  # common prefix 3 (1, 2, 3); [9, 9] must keep its last token: 1 < 2
    items = [Sized(i, n) for i, n in enumerate([100, 3000, 120, 90, 2900])]
    buckets, too_big = plan_buckets(items, 1, 10_000, 8, groups)
    assert not too_big
    assert [[it.item for it in b.items] for b in buckets] == [[1, 4], [0, 2, 3]]  # a group stays together
    assert buckets[0].slots == 2 and buckets[0].max_tokens == 3000


def test_pool_plan_holds_every_job_at_its_own_length():
    items = [Sized(i, 3000) for i in range(4)] + [Sized(4 + i, 300) for i in range(6)]
    static, _ = plan_buckets(items, 1, 30_000, 8)
    assert [(len(b.items), b.slots) for b in static] == [(4, 4), (6, 6)]
    # One pool for all: as large as the jobs need together (13,800), 8 slots, longest first.
    pool, too_big = plan_pool(items, 1, 30_000, 8, slot_tokens=100)
    assert not too_big and (pool.slots, pool.pool, pool.max_tokens) == (8, 13_800, 3000)
    assert [it.tokens for it in pool.items] == [3000] * 4 + [300] * 6
    # Little memory: fewer slots, so that the pool still holds the longest job; what cannot fit is too big.
    tight, too_big = plan_pool(items + [Sized(10, 9000)], 1, 6_000, 8, slot_tokens=1000)
    assert (tight.slots, tight.pool) == (3, 3000) and [it.item for it in too_big] == [10]
    # A group keeps its members together at its longest member's place.
    grouped, _ = plan_pool([Sized(0, 10), Sized(1, 50), Sized(2, 40), Sized(3, 20)], 1, 1000, 4,
                           groups=[7, -1, -1, 7])
    assert [it.item for it in grouped.items] == [1, 2, 0, 3]


def test_pool_plan_orders_by_a_rank_groups_together():
    items = [Sized(0, 500), Sized(1, 300), Sized(2, 400), Sized(3, 200)]
    out = {0: 4, 1: 40, 2: 6, 3: 10}  # new tokens per item
    pool, _ = plan_pool(items, 1, 10_000, 4, rank=lambda it: out[it.item])
    assert [it.item for it in pool.items] == [1, 3, 2, 0]  # most new tokens first
    grouped, _ = plan_pool(items, 1, 10_000, 4, groups=[5, -1, -1, 5], rank=lambda it: out[it.item])
    assert [it.item for it in grouped.items] == [1, 0, 3, 2]  # a group at its highest member's place


def test_output_order_changes_no_tokens_and_ends_the_batch_sooner(ckpt, tmp_path):
    """`decode.order=output`: the long decode starts first instead of trailing alone after the long prompts; every
    job's tokens are the same as in length order (and as alone), in fewer decode steps."""
    from sfi.config import load_config
    from sfi.engine import RunOptions, run

    jobs = [{"id": f"long-prompt-{i}", "prompt": TEXT[i * 50: i * 50 + 900], "max_new_tokens": 4} for i in range(6)]
    jobs.append({"id": "long-output", "prompt": TEXT[:120], "max_new_tokens": 40})
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    steps, texts = {}, {}
    for order in ("length", "output"):
        out = tmp_path / f"{order}.jsonl"
        config = load_config("dense", ["decode.max_batch_size=2", f"decode.order={order}"])
        s = run(RunOptions(jobs=str(path), output=str(out), model=ckpt, config=config, overwrite=True))
        assert s.failed == 0
        steps[order] = s.decode_steps
        texts[order] = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert texts["output"] == texts["length"]
    assert steps["output"] < steps["length"] - 8, steps


def test_pooled_cache_segments_first_fit_and_merge():
    from sfi.cache import KVCache

    c = KVCache.pooled(1, 4, 1, 100, 2, torch.float32, "cpu")
    c.place(0, 30)
    c.place(1, 50)
    c.place(2, 20)
    assert c.base[:3] == [0, 30, 80] and not c.fits(1)
    with pytest.raises(ValueError, match="no free run"):
        c.place(3, 1)
    c.release(0)
    c.release(2)
    assert c.fits(30) and not c.fits(31) and c.free_positions == 50  # two runs of 30 and 20: not merged
    c.release(1)
    assert c._free == [(0, 100)]  # all three merged back
    c.place(3, 100)
    assert c.base[3] == 0 and c.max_len == 101  # the scratch position past the pool
def test_kill_9_then_resume_loses_and_duplicates_nothing(ckpt, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(j | {"max_new_tokens": 40}) + "\n" for j in JOBS))
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "sfi_cli.main", "run", str(jobs), "-m", ckpt, "-o", str(out), "-q",
            "--set", "decode.max_batch_size=2"]
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 240
    while (not out.exists() or out.read_text().count("\n") < 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(out.read_text().splitlines())
    assert subprocess.run(argv, timeout=300).returncode == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(j["id"] for j in JOBS) and done_before < len(JOBS)


def test_time_split_and_rates_in_the_report(ckpt, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in JOBS))
    report = tmp_path / "r.json"
    assert main(["run", str(path), "-m", ckpt, "-o", str(tmp_path / "o.jsonl"), "-q", "--report", str(report)]) == 0
    t = json.loads(report.read_text())["timing"]
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and t["idle_s"] >= 0, t
    assert t["load_s"] + t["prefill_s"] + t["decode_s"] + t["idle_s"] == pytest.approx(t["elapsed_s"], abs=0.01), t
    assert t["jobs_per_hour"] == pytest.approx(len(JOBS) * 3600 / t["elapsed_s"], rel=0.01), t
    assert t["end_to_end_tok_s"] > 0, t


def test_gpu_memory_held_unused_by_pytorch_counts_as_available(monkeypatch):
    """A run's freed caches stay reserved by PyTorch's allocator: the next run in the process may plan with them
    (otherwise each run of `sfi bench --workload` planned narrower batches than the one before)."""
    from sfi.engine import scheduler

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 8 << 30)
    assert scheduler.available_memory(torch.device("cuda", 0)) == (10 + 42) << 30


def test_kv_budget_leaves_room_for_the_bootstrap_pass(ckpt):
    """With SFI the KV budget's headroom holds one bootstrap pass: at least one layer's float32 logits and keys at the
    longest job (twice: the Selector pads a copy), at most the pass's byte bound."""
    from sfi.attention import BOOTSTRAP_BYTES
    from sfi.engine.run import activation_bytes

    a = load_model(ckpt, device="cpu").args
    for tokens in (300, 40_000):
        extra = activation_bytes(a, 64, tokens, 4, False, window=16) - activation_bytes(a, 64, tokens, 4, False)
        one_layer = 4 * tokens * (a.n_heads * 16 + a.n_kv_heads * a.head_dim)
        assert 2 * one_layer <= extra <= 2 * max(one_layer, BOOTSTRAP_BYTES)
        assert extra == 2 * min(a.n_layers * one_layer, max(one_layer, BOOTSTRAP_BYTES))


@pytest.mark.parametrize("sfi", [True, False])
def test_pipelined_steps_decode_what_steps_one_at_a_time_decode(ckpt, sfi):
    """Each step planned and staged while the last one runs, from a guess of what its tokens decide, and launched
    before the last one's bookkeeping: every job's tokens, its rows' kinds and its SFI report are those of steps
    taken one at a time, through sentence boundaries the guess misses, rows that stop on an eos id or their token
    budget, sampled rows and admissions between steps; and the guess is both taken and refused."""
    lm = load_model(ckpt, device="cpu")
    cfg = SfiConfig(sink=4, k_head=16, recent=8)
    ids = tiny.tokenizer()(TEXT)["input_ids"]
    boundary = tiny.ThirdIds()
    specs = [(0, 200, 16, 0.0), (5, 120, 30, 0.8), (9, 260, 12, 0.0), (3, 90, 24, 0.7), (7, 150, 20, 0.0),
             (11, 70, 18, 0.0)]

    def run(pipeline: bool, eos: frozenset[int]):
        rt = SfiRuntime(cfg, boundary, 4, lm.args.kv_bytes_per_token(lm.model.dtype)) if sfi else None
        decoder = Decoder(lm.model, 4, 400, rt, prefill_chunk=32, pipeline=pipeline)
        reqs = [Request(ids[o:o + n], RowSampler(SamplingParams(temperature=t, seed=o), 0),
                        StopChecker(lm.tokenizer, eos, (), m)) for o, n, m, t in specs]
        queue, holder = list(enumerate(reqs)), {}
        kinds: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
        reports: dict[int, dict] = {}
        while queue or decoder.busy:
            for slot in decoder.free[:1]:  # one admission per step: the decoding count keeps changing
                if queue:
                    holder[slot], request = queue.pop(0)
                    decoder.admit(slot, request)
            decoder.prefill(32)
            event = decoder.step()
            if event is not None:
                for slot, kind in zip(event.rows, event.kinds or ["dense"] * len(event.rows), strict=True):
                    kinds[holder[slot]].append(kind)
                for slot in event.finished:
                    if rt is not None:  # all but the estimate, which prices steps by their measured times
                        reports[holder[slot]] = rt.report(slot) | {"estimated_speedup": None}
        return [r.stopper.token_ids for r in reqs], kinds, reports, decoder

    free_tokens, _, _, _ = run(False, frozenset())
    # An eos id the first job samples mid-way, so that rows also stop on a token no guess foresees.
    eos = frozenset({free_tokens[0][5]})
    plain = run(False, eos)
    piped = run(True, eos)
    assert piped[:3] == plain[:3]
    assert any(len(t) < m for t, (_, _, m, _) in zip(plain[0], specs, strict=True))  # some row stopped on eos
    if sfi:
        assert sum(k.count("slow") for k in plain[1].values()) > 10
    assert piped[3].planned_ahead > 0 and piped[3].replanned > 0
    assert plain[3].planned_ahead == plain[3].replanned == 0



def test_pipelined_step_times_leave_out_prefills_between_them(ckpt):
    """A prefill between two calls waits for the step in flight first: a step's time ends there, and the prefill's
    is its own, so steps' and prefills' times never overlap (their sum fits in the loop's wall time)."""
    lm = load_model(ckpt, device="cpu")
    ids = tiny.tokenizer()(TEXT)["input_ids"]
    rt = SfiRuntime(SfiConfig(sink=4, k_head=16, recent=8), FixedPeriod(4), 2,
                    lm.args.kv_bytes_per_token(lm.model.dtype))
    decoder = Decoder(lm.model, 2, 600, rt, prefill_chunk=32, pipeline=True)
    reqs = [Request(ids[o:o + 300], RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), m))
            for o, m in ((0, 6), (5, 20), (9, 12), (3, 8))]
    queue, timed = list(reqs), 0.0
    started = time.perf_counter()
    while queue or decoder.busy:
        for slot in decoder.free:
            if queue:
                decoder.admit(slot, queue.pop(0))
        timed += sum(e.seconds for e in decoder.prefill(32))  # a chunk per step: prompts prefill between steps
        event = decoder.step()
        timed += event.seconds if event is not None else 0.0
    wall = time.perf_counter() - started
    assert decoder.planned_ahead > 0 and all(r.stopper.finished for r in reqs)
    assert timed <= wall
