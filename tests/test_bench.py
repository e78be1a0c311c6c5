"""`sfi bench` on the tiny preset on CPU: it runs every baseline and writes its outputs."""

from __future__ import annotations

import csv
import json

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
    assert main(argv) == 0  # a second run appends
    lines = list(csv.DictReader(table.open()))
    assert len(lines) == 4 and {line["batch"] for line in lines} == {"1", "2"}
    err = capsys.readouterr().err
    assert "sfi bench" in err and result["copy_bandwidth_GBps"] > 0  # host memory bandwidth on a CPU
    assert not any(line.lstrip().startswith("{") for line in err.splitlines())  # JSON only in --json
    assert "300 x 1: SFI" in err and "300 x 1: transformers.generate" in err and "GB/s" in err
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
