"""`sfi bench` on the tiny preset on CPU: it runs every baseline and writes its outputs."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from sfi_cli.main import main


def test_bench_tiny_preset_writes_json_and_csv(tmp_path, capsys):
    out, table = tmp_path / "bench.json", tmp_path / "bench.csv"
    argv = ["bench", "--preset", "qwen3-tiny", "--ctx", "300", "--batch", "1,2", "--new-tokens", "60",
            "--set", "sfi.k_head=32", "--set", "sfi.recent=16", "--json", str(out), "--csv", str(table),
            "--plot", str(tmp_path / "bench.png")]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["parity"]["argmax_agreement"] == 1.0
    runs = {(r["ctx"], r["batch"]): r for r in result["runs"]}
    assert set(runs) == {(300, 1), (300, 2)}
    for r in runs.values():
        assert r["sfi"]["tok_s"] > 0 and r["dense"]["tok_s"] > 0 and r["hf_generate"]["tok_s"] > 0
        assert 0 < r["sfi"]["slow_fraction"] < 0.2  # a slow step every 24 tokens per row
        assert r["sfi"]["attended_fraction"] < 0.5
        assert r["dense"]["slow_fraction"] == 1.0
        # The plain-PyTorch baseline, and every SFI ratio against the faster of it and our dense.
        assert r["torch"]["tok_s"] > 0 and r["torch"]["pct_roofline"] > 0
        best = max(r["dense"]["tok_s"], r["torch"]["tok_s"])
        assert r["sfi_over_best_dense"] == pytest.approx(r["sfi"]["tok_s"] / best)
        assert r[r["best_dense"]]["tok_s"] == best
    assert main(argv) == 0  # a second run appends
    lines = list(csv.DictReader(table.open()))
    assert len(lines) == 4 and {line["batch"] for line in lines} == {"1", "2"}
    assert all(float(line["torch_tok_s"]) > 0 and float(line["sfi_over_best_dense"]) > 0 for line in lines)
    err = capsys.readouterr().err
    assert "sfi bench" in err and result["copy_bandwidth_GBps"] > 0  # host memory bandwidth on a CPU
    assert not any(line.lstrip().startswith("{") for line in err.splitlines())  # JSON only in --json
    assert "300 x 1: SFI" in err and "300 x 1: transformers.generate" in err and "GB/s" in err
    assert "plain PyTorch" in err
    assert all(r["sfi"]["pct_roofline"] > 0 for r in runs.values())
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # saved results plot later, merged
    assert main(["plot", str(out), str(out), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000
    assert main(["plot", str(table), "-o", str(tmp_path / "bad.png")]) == 1  # a CSV is not a bench JSON
    assert "not a readable sfi bench JSON" in capsys.readouterr().err


def test_bench_a_real_checkpoint(tmp_path):
    import tiny

    folder = tiny.make_checkpoint(tmp_path / "ckpt", "llama", seed=2)
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(folder), "--ctx", "200,100000", "--batch", "1", "--new-tokens", "40",
            "--set", "sfi.k_head=32", "--set", "sfi.recent=16", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == "checkpoint" and result["preset"] == str(folder)
    ok, too_long = result["runs"]
    assert ok["sfi"]["tok_s"] > 0 and ok["hf_generate"]["tok_s"] > 0 and ok["sfi"]["attended_fraction"] < 0.6
    assert "context" in too_long["error"]
    assert main(["bench", "--model", str(folder), "--random-weights"]) == 1


@pytest.mark.long
def test_workload_bench_runs_sfi_and_dense_continuous_and_static(tmp_path):
    from sfi.tools.workload import mix_jobs, write_jobs

    import tiny

    folder = tiny.make_checkpoint(tmp_path / "ckpt", "qwen3", seed=4)
    jobs = mix_jobs(tiny.tokenizer(), n_jobs=7, lengths=(60, 200), new_tokens=(3, 9), documents=1, questions=3,
                    document_lengths=(150, 220), seed=1)
    assert len(jobs) == 7 and sum(j["id"].startswith("doc0-") for j in jobs) == 3
    assert jobs == mix_jobs(tiny.tokenizer(), n_jobs=7, lengths=(60, 200), new_tokens=(3, 9), documents=1,
                            questions=3, document_lengths=(150, 220), seed=1)  # seeded
    path = tmp_path / "mix.jsonl"
    write_jobs(path, jobs)
    out = tmp_path / "workload.json"
    assert main(["bench", "--workload", str(path), "-m", str(folder), "--set", "decode.max_batch_size=3",
                 "--set", "decode.prefix_min_tokens=64", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert [(r["recipe"], r["continuous"]) for r in result["runs"]] == [
        ("default", True), ("default", False), ("dense", True), ("dense", False)]
    want = sum(j["max_new_tokens"] for j in jobs)  # end-of-sequence ignored: every job writes all its tokens
    for r in result["runs"]:
        assert r["jobs"] == 7 and r["failed"] == 0 and r["completion_tokens"] == want and r["jobs_per_hour"] > 0
        assert r["prefill_tokens_reused"] > 0  # two of the three questions copy the document
        assert r["load_s"] + r["prefill_s"] + r["decode_s"] + r["idle_s"] == pytest.approx(r["elapsed_s"], abs=0.05)
        assert r["decode_steps"] > 0 and r["mean_rows_per_step"] == pytest.approx(want / r["decode_steps"], abs=0.01)
        assert r["graph_captures"] == 0 and r["oom_retries"] == 0  # a CPU captures no graphs
    from io import StringIO

    from rich.console import Console

    from sfi_cli.render import workload_table

    shown = StringIO()
    workload_table(result, Console(file=shown, width=250))
    assert "default, continuous batches" in shown.getvalue() and "rows/step" in shown.getvalue()
    assert set(result["ratios"]) == {"default: continuous / static jobs per hour",
                                     "dense: continuous / static jobs per hour",
                                     "default / dense jobs per hour (continuous)"}


def test_bench_rows_go_slow_on_different_steps():
    """The bench's slow steps are staggered across rows (as a real batch's sentence boundaries are), also after
    admission reset each row's state: with 4 rows and a period of 8, about half the steps hold a slow row, never
    two rows at once, and the step-time split by kind is reported."""
    import torch

    from sfi.config import SfiConfig
    from sfi.tools.bench import bench_ours, random_model

    model = random_model("qwen3-tiny", 512, torch.device("cpu"), torch.float32)
    cfg = SfiConfig(sink=4, k_head=32, recent=16)
    r = bench_ours(model, 300, 4, 42, cfg, period=8, warmup_steps=1)
    assert 0.4 <= r["steps_with_slow"] <= 0.6, r
    assert r["slow_fraction"] == pytest.approx(1 / 8, abs=0.04)
    assert r["step_ms_with_slow_p50"] > 0 and r["step_ms_fast_only_p50"] > 0
    from sfi.method.boundary import BoundaryState
    from sfi.tools.bench import StaggeredPeriod

    boundary, states = StaggeredPeriod(8, 4), [BoundaryState() for _ in range(4)]
    slow_rows = [sum(boundary.observe(s, 0) for s in states) for _ in range(32)]
    assert max(slow_rows) == 1 and sum(slow_rows) == 16
    # A pipelined decoder guesses each row's answer before observing it: the guess is that answer and sets no phase.
    guessed, states = StaggeredPeriod(8, 4), [BoundaryState() for _ in range(4)]
    slow_guessed = []
    for _ in range(32):
        guesses = [guessed.guess(dataclasses.replace(s)) for s in states]
        answers = [guessed.observe(s, 0) for s in states]
        assert guesses == answers
        slow_guessed.append(sum(answers))
    assert slow_guessed == slow_rows
