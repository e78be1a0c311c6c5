"""`sfi run` end to end through the CLI entry point, on a tiny random checkpoint.

Covers the pipeline contract: one complete line per job, bad jobs failing alone, resume after a kill,
stdin/stdout, locks, exit codes, and batching that does not change any job's output.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import sfi.engine
import sfi.engine.decoder
import sfi.loader
from sfi.config import derived_budget
from sfi.model import Transformer
from sfi.results import ResultWriter
from sfi_cli.main import main

import tiny

JOBS = [
    {"id": "p1", "prompt": "The quick brown fox", "max_new_tokens": 9},
    {"id": "p2", "prompt": tiny.TEXT, "max_new_tokens": 6},
    {"id": "c1", "messages": [{"role": "user", "content": "Call me Ishmael."}], "max_new_tokens": 7},
    {"id": "s1", "prompt": "Is it raining?", "max_new_tokens": 8, "temperature": 0.9, "seed": 5},
    {"id": "s2", "prompt": "Numbers: 0 1 2", "max_new_tokens": 8, "temperature": 1.0, "top_k": 20},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny.make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3"))


def write_jobs(path, jobs, extra_lines=()):
    lines = [json.dumps(j) for j in jobs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def read_out(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(records):
    return {r["id"]: r for r in records}


def test_all_jobs_succeed_exit_0_with_report(ckpt, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "--report", str(report), "-q"]) == 0
    records = by_id(read_out(out))
    assert set(records) == {j["id"] for j in JOBS}
    for job in JOBS:
        r = records[job["id"]]
        assert r["finish_reason"] in ("stop", "length") and r["error"] is None
        assert 1 <= r["completion_tokens"] <= job["max_new_tokens"]
        assert r["prompt_tokens"] > 0 and r["timing"]["decode_s"] >= 0
    rep = json.loads(report.read_text())
    assert rep["jobs"]["succeeded"] == len(JOBS) and rep["exit_code"] == 0
    # the budget follows the model's context (512 tokens here) and the report says so
    assert rep["config"]["recipe"] == "default" and rep["config"]["sfi"]["k_head"] == derived_budget(512)[0] == 64
    assert rep["config"]["sfi"]["recent"] == derived_budget(512)[1] and "derived" in rep["sfi"]["budget"]
    assert rep["tokens"]["completion"] == sum(r["completion_tokens"] for r in records.values())


def test_bad_lines_fail_alone_exit_2(ckpt, tmp_path, capsys):
    bad = ['{"id": "broken", "prompt": 5}', "not json at all", '{"id": "p1", "prompt": "dup"}']
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:2], bad)
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out)]) == 2
    records = by_id(read_out(out))
    assert records["p1"]["finish_reason"] != "error" and records["p2"]["finish_reason"] != "error"
    assert records["broken"]["finish_reason"] == "error"
    assert "jobs.jsonl:3" in records["broken"]["error"] and "prompt" in records["broken"]["error"]
    assert len(records) == 3  # the duplicate and the id-less line have no line of their own
    assert "jobs.jsonl:4: malformed JSON" in capsys.readouterr().err


def test_strict_aborts_before_loading_the_model(ckpt, tmp_path, monkeypatch, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1], ['{"id": "x", "prompt": ""}'])

    def no_load(*a, **k):
        raise AssertionError("model loaded despite --strict")

    monkeypatch.setattr(sfi.loader, "load_model", no_load)
    assert main(["run", jobs, "-m", ckpt, "-o", str(tmp_path / "o.jsonl"), "--strict"]) == 1
    assert "jobs.jsonl:2: field 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--set", "sfi.k_hed=3"], "did you mean 'k_head'"),
    (["--set", "decode.max_batch_size=0"], "max_batch_size must be >= 1"),
    (["--bogus-flag"], "No such option"),
    (["--output-format", "xml"], "xml"),
])
def test_usage_and_config_errors_exit_1(ckpt, tmp_path, capsys, argv, message):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    assert main(["run", jobs, "-m", ckpt, *argv]) == 1
    assert message in capsys.readouterr().err


def test_missing_jobs_file_exit_1(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_stdin_to_stdout_pipeline(ckpt, monkeypatch, capsys):
    data = "\n".join(json.dumps(j) for j in JOBS[:3]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    assert main(["run", "-", "-m", ckpt, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ["c1", "p1", "p2"]


def test_interrupt_then_resume_redoes_nothing_finished(ckpt, tmp_path, monkeypatch):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    reference = tmp_path / "ref.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(reference), "-q", "--set", "decode.max_batch_size=1"]) == 0

    # Kill the run after two results: KeyboardInterrupt is what Ctrl-C and SIGTERM both become.
    out = tmp_path / "out.jsonl"
    real_emit = sfi.engine.Runner._emit
    count = {"n": 0}

    def emit_then_die(self, writer, result):
        if count["n"] == 2:
            raise KeyboardInterrupt
        count["n"] += 1
        real_emit(self, writer, result)

    monkeypatch.setattr(sfi.engine.Runner, "_emit", emit_then_die)
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q", "--set", "decode.max_batch_size=1"]) == 130
    monkeypatch.setattr(sfi.engine.Runner, "_emit", real_emit)
    first = read_out(out)
    assert len(first) == 2
    with out.open("a") as f:  # and a torn line, as from a kill -9 in the middle of a write
        f.write('{"id": "p2", "text": "half')

    admitted: list[int] = []
    real_admit = sfi.engine.decoder.Decoder.admit

    def counting_admit(self, slot, request, *a, **k):
        admitted.append(slot)
        real_admit(self, slot, request, *a, **k)

    monkeypatch.setattr(sfi.engine.decoder.Decoder, "admit", counting_admit)
    report = tmp_path / "r.json"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q", "--set", "decode.max_batch_size=1",
                 "--report", str(report)]) == 0
    assert len(admitted) == len(JOBS) - 2
    assert json.loads(report.read_text())["jobs"]["skipped"] == 2
    final = read_out(out)
    assert len(final) == len(JOBS) and len(by_id(final)) == len(JOBS)
    ref = by_id(read_out(reference))
    assert {k: v["text"] for k, v in by_id(final).items()} == {k: v["text"] for k, v in ref.items()}


def test_overwrite_starts_over(ckpt, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:2])
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q"]) == 0
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q", "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["jobs"]["skipped"] == 2
    argv = ["run", jobs, "-m", ckpt, "-o", str(out), "-q", "--overwrite", "--report", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["jobs"]["succeeded"] == 2
    assert len(read_out(out)) == 2


def test_batching_does_not_change_outputs(ckpt, tmp_path):
    """Greedy and seeded sampled jobs give the same text whether batched together or decoded alone."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    alone, batched = tmp_path / "alone.jsonl", tmp_path / "batched.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(alone), "-q", "--set", "decode.max_batch_size=1"]) == 0
    assert main(["run", jobs, "-m", ckpt, "-o", str(batched), "-q"]) == 0
    a, b = by_id(read_out(alone)), by_id(read_out(batched))
    assert {k: (v["text"], v["completion_tokens"]) for k, v in a.items()} == \
        {k: (v["text"], v["completion_tokens"]) for k, v in b.items()}


def test_out_of_memory_splits_the_batch_and_loses_nothing(ckpt, tmp_path, monkeypatch, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    ref = tmp_path / "ref.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(ref), "-q", "--set", "decode.max_batch_size=1"]) == 0
    real_decode = Transformer.decode

    def decode_small_batches_only(self, tokens, cache, step):
        if cache.batch > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_decode(self, tokens, cache, step)

    monkeypatch.setattr(Transformer, "decode", decode_small_batches_only)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "--report", str(report)]) == 0
    assert "out of memory with 5 rows" in capsys.readouterr().err
    assert json.loads(report.read_text())["timing"]["oom_retries"] == 1  # 5 rows, then 2, which fit
    got = by_id(read_out(out))
    assert {k: v["text"] for k, v in got.items()} == {k: v["text"] for k, v in by_id(read_out(ref)).items()}


def test_out_of_memory_frees_the_failed_attempt_before_the_next(ckpt, tmp_path, monkeypatch):
    """After running out of memory, the failed attempt's KV pool (most of a GPU's memory) is gone before the next,
    smaller pool is allocated: otherwise the retry runs out too, and so on down to single jobs that fail."""
    import gc
    import weakref

    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    real_decode, real_pool = Transformer.decode, Transformer.new_pool
    pools: list[weakref.ref] = []
    alive_at_retry: list[int] = []

    def decode_small_batches_only(self, tokens, cache, step):
        if cache.batch > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_decode(self, tokens, cache, step)

    def new_pool(self, *args):
        gc.collect()  # only what is still referenced counts
        alive_at_retry.append(sum(ref() is not None for ref in pools))
        pool = real_pool(self, *args)
        pools.append(weakref.ref(pool.k))
        return pool

    monkeypatch.setattr(Transformer, "decode", decode_small_batches_only)
    monkeypatch.setattr(Transformer, "new_pool", new_pool)
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q"]) == 0
    assert len(alive_at_retry) == 2 and alive_at_retry == [0, 0]
    assert len(by_id(read_out(out))) == len(JOBS)


def test_a_pool_that_never_fits_fails_each_job_once_and_ends(ckpt, tmp_path, monkeypatch):
    """Out of memory allocating the cache itself, before any job starts: halving down to one row, then each job
    fails alone (its own error line) instead of the run retrying forever."""
    calls = []

    def new_pool(self, *args):
        calls.append(args)
        if len(calls) > 50:
            raise RuntimeError("retrying forever")
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(Transformer, "new_pool", new_pool)
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q"]) != 0
    got = by_id(read_out(out))
    assert set(got) == {j["id"] for j in JOBS}
    assert all(r["finish_reason"] == "error" and "out of memory" in r["error"] for r in got.values())


def test_prompt_longer_than_context_fails_alone_unless_truncated(ckpt, tmp_path):
    long = {"id": "long", "prompt": tiny.TEXT * 12, "max_new_tokens": 4}  # well past the 512-token context
    jobs = write_jobs(tmp_path / "jobs.jsonl", [long, JOBS[0]])
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q"]) == 2
    got = by_id(read_out(out))
    assert got["long"]["finish_reason"] == "error" and "context is 512" in got["long"]["error"]
    assert got["p1"]["finish_reason"] != "error"
    for mode in ("left", "middle"):
        out2 = tmp_path / f"{mode}.jsonl"
        assert main(["run", jobs, "-m", ckpt, "-o", str(out2), "-q", "--truncate", mode]) == 0
        r = by_id(read_out(out2))["long"]
        assert r["prompt_tokens"] + 4 <= 512 and r["truncated_from"] > 512


def test_second_writer_on_the_same_output_is_refused(ckpt, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    out = tmp_path / "out.jsonl"
    with ResultWriter(str(out)):
        assert main(["run", jobs, "-m", ckpt, "-o", str(out)]) == 1
    assert "another sfi run" in capsys.readouterr().err


def test_openai_batch_lines_in_and_out(ckpt, tmp_path):
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "x", "prompt": "Call me", "max_completion_tokens": 4}},
    ]
    jobs = write_jobs(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "--output-format", "openai", "-q"]) == 0
    got = {r["custom_id"]: r for r in read_out(out)}
    chat, cmpl = got["chat-1"]["response"], got["cmpl-1"]["response"]
    assert chat["status_code"] == 200 and chat["body"]["object"] == "chat.completion"
    assert chat["body"]["usage"]["completion_tokens"] <= 5
    assert isinstance(chat["body"]["choices"][0]["message"]["content"], str)
    assert cmpl["body"]["object"] == "text_completion" and cmpl["body"]["usage"]["completion_tokens"] <= 4


def test_recipes_command_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("default", "quality", "dense", "tiny"):
        assert name in out


def test_sfi_reports_and_compare_dense(ckpt, tmp_path):
    """Long-enough prompts under the tiny recipe take sparse steps; every line reports them, and
    --compare dense adds the measured comparison."""
    long_jobs = [{"id": f"long{i}", "prompt": (tiny.TEXT * 3)[i * 40:], "max_new_tokens": 30} for i in range(3)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", long_jobs)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    argv = ["run", jobs, "-m", ckpt, "-o", str(out), "-r", "tiny", "--set", "sfi.k_head=16", "--set",
            "sfi.recent=16", "--compare", "dense", "-q", "--report", str(report)]
    assert main(argv) == 0
    for r in read_out(out):
        sfi, cmp = r["sfi"], r["compare_dense"]
        assert sfi["slow_steps"] + sfi["fast_steps"] == r["completion_tokens"]
        assert sfi["fast_steps"] > 0 and sfi["attended_fraction"] < 1
        assert sfi["kv_bytes_read"] < sfi["kv_bytes_dense"]
        assert 0 <= cmp["token_agreement"] <= 1 and isinstance(cmp["identical"], bool)
        assert cmp["identical"] == (cmp["token_agreement"] == 1.0)
        assert cmp["dense_decode_tok_s"] > 0
    whole = json.loads(report.read_text())
    rep, t = whole["sfi"], whole["timing"]
    assert rep["fast_steps"] == sum(r["sfi"]["fast_steps"] for r in read_out(out))
    # The dense pass has its own line in the time split, not "other".
    assert t["compare_s"] > 0 and t["idle_s"] < t["compare_s"]
    split = t["load_s"] + t["prefill_s"] + t["decode_s"] + t["compare_s"] + t["idle_s"]
    assert split == pytest.approx(t["elapsed_s"], abs=0.01)
    dense_out = tmp_path / "dense.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(dense_out), "-r", "dense", "-q"]) == 0
    for r in read_out(dense_out):
        assert r["sfi"]["fast_steps"] == 0 and r["sfi"]["attended_fraction"] == 1.0


def _sfi(*argv, **kw):
    """`sfi` in a fresh interpreter, as a shell user runs it (real pipes and devices, no captured streams)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "sfi_cli.main", *argv], capture_output=True, text=True,
                          timeout=300, **kw)


def test_every_output_path_a_shell_user_types(ckpt, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:2])
    piped = _sfi("run", jobs, "-m", ckpt, "-o", "/dev/stdout", "-q")  # stdout is a pipe here
    assert piped.returncode == 0, piped.stderr
    assert sorted(json.loads(line)["id"] for line in piped.stdout.splitlines()) == ["p1", "p2"]
    null = _sfi("run", jobs, "-m", ckpt, "-o", "/dev/null", "-q")
    assert null.returncode == 0 and null.stderr == "" and not (tmp_path / "null.lock").exists()
    full = _sfi("run", jobs, "-m", ckpt, "-o", "/dev/full", "-q")
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert full.stderr.strip() == "sfi: error: cannot write to /dev/full: No space left on device"


def test_unwritable_report_fails_before_the_model_loads(ckpt, tmp_path, monkeypatch, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])

    def no_load(*a, **k):
        raise AssertionError("model loaded before the report path was checked")

    monkeypatch.setattr(sfi.loader, "load_model", no_load)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "--report", str(tmp_path / "file" / "r.json")]) == 1
    assert "cannot" in capsys.readouterr().err and not out.exists()


def test_failed_model_load_leaves_no_output(tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", str(tmp_path / "no-such-model"), "-o", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.jsonl.lock").exists()


def test_help_validation_and_a_refused_lock_do_not_import_torch(ckpt, tmp_path):
    """`--help`, `sfi recipes`, `--strict` refusing bad lines and a refused lock answer without torch."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1], ['{"id": "x"}'])
    out = tmp_path / "out.jsonl"
    probe = ("import sys; from sfi_cli.main import main; code = main(sys.argv[1:]); "
             "print('torch' in sys.modules, code, file=sys.stderr)")
    cases = [["--help"], ["run", "--help"], ["recipes"], ["run", jobs, "-m", ckpt, "-o", str(out), "--strict"],
             ["run", write_jobs(tmp_path / "ok.jsonl", JOBS[:1]), "-m", ckpt, "-o", str(out)]]
    import subprocess

    with ResultWriter(str(out)):  # holds the lock: the last case is refused
        for argv in cases:
            r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
            assert r.stderr.strip().splitlines()[-1] in ("False 0", "False 1"), (argv, r.stderr)


def test_help_shows_bracketed_text(capsys):
    assert main(["run", "--help"]) == 0
    assert "[default: 256]" in " ".join(capsys.readouterr().out.split())
    assert main(["bench", "--help"]) == 0
    assert "sfi[plot]" in capsys.readouterr().out


def test_plain_log_lines_are_prefixed_once_and_name_the_model_once(ckpt, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:2])
    assert main(["run", jobs, "-m", ckpt, "-o", str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("sfi: ") and not line.startswith("sfi: sfi") for line in err)
    assert sum(line.startswith("sfi: model") for line in err) == 1
    assert any(line.startswith("sfi: budget: sink 4, k_head 64, recent 32 (derived from") for line in err)


def test_recipes_are_listed_in_aligned_columns(capsys):
    assert main(["recipes"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("(")]
    names = [line.split()[0] for line in lines]
    starts = {len(line) - len(line[len(name):].lstrip()) for line, name in zip(lines, names, strict=True)}
    assert "smol-streaming" in names and len(starts) == 1


def test_max_new_tokens_cap_bounds_every_job(ckpt, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)  # their own max_new_tokens are 6 to 9
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q", "--max-new-tokens-cap", "3"]) == 0
    assert all(1 <= r["completion_tokens"] <= 3 for r in read_out(out))


def test_a_job_within_the_budget_says_so_and_gets_no_speedup(ckpt, tmp_path):
    """The default budget on this 512-token model is 4 + 64 + 32: a short job never engages SFI."""
    long_job = {"id": "long", "prompt": tiny.TEXT * 2, "max_new_tokens": 20}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [JOBS[0], long_job])
    out = tmp_path / "out.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(out), "-q", "--compare", "dense"]) == 0
    got = by_id(read_out(out))
    short, engaged = got["p1"], got["long"]
    assert short["sfi"]["sparse"] is False and "context within budget" in short["sfi"]["reason"]
    assert short["sfi"]["estimated_speedup"] is None and short["compare_dense"]["speedup"] is None
    assert engaged["sfi"]["sparse"] is True and engaged["sfi"]["attended_fraction"] < 1
    assert engaged["compare_dense"]["speedup"] > 0
