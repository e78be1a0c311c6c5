"""`sfi run --workers N` (and `--gpus`): worker processes, one output written by the driver, and no job lost or
duplicated when a worker dies."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from sfi.engine.workers import gpu_devices, split_jobs, visible_gpus
from sfi.errors import ConfigError
from sfi.jobs import parse_jobs
from sfi_cli.main import main

import tiny

TEXT = tiny.TEXT * 3
JOBS = [{"id": f"j{i}", "prompt": TEXT[i * 29: i * 29 + 80 + 40 * (i % 3)], "max_new_tokens": 8 + 5 * (i % 4)}
        for i in range(8)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny.make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3"))


def _write(path, jobs):
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return str(path)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_devices():
    three = ["0", "1", "2"]
    assert gpu_devices("all", three) == three
    assert gpu_devices("2", three) == ["0", "1"] and gpu_devices("0,2", three) == ["0", "2"]
    for bad in ("4", "0,3", "0,0", "x", "0"):
        with pytest.raises(ConfigError):
            gpu_devices(bad, three)
    with pytest.raises(ConfigError, match="--workers"):
        gpu_devices("all", [])
    # Indices are of the GPUs this process sees: under CUDA_VISIBLE_DEVICES=5,7, GPU 1 is the machine's 7.
    assert gpu_devices("1,0", ["5", "7"]) == ["7", "5"]


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-8a1b,1,-1,2")
    assert visible_gpus() == ["3", "GPU-8a1b", "1"]  # CUDA stops at the first invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_split_jobs_balances_work_and_keeps_shared_prefixes_together():
    doc = "lorem ipsum " * 300  # 3,600 characters: past the prefix the split compares
    lines = [json.dumps({"id": f"q{i}", "prompt": doc + f"question {i}"}).encode() for i in range(4)]
    lines += [json.dumps({"id": f"s{i}", "prompt": "x" * (400 * (i + 1)), "max_new_tokens": 10}).encode()
              for i in range(6)]
    jobs = parse_jobs(lines, "j").jobs
    shares = split_jobs(jobs, 3, 256)
    assert sorted(j.id for s in shares for j in s) == sorted(j.id for j in jobs)  # each job once
    holders = {i for i, s in enumerate(shares) for j in s if j.id.startswith("q")}
    assert len(holders) == 1  # the four questions on one document go to one worker
    assert len(shares) == 3


def test_two_workers_write_what_one_process_writes(ckpt, tmp_path):
    jobs = _write(tmp_path / "jobs.jsonl", JOBS + [{"id": "bad", "prompt": 7}])
    one, two, report = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "r.json"
    assert main(["run", jobs, "-m", ckpt, "-o", str(one), "-q"]) == 2  # the bad line fails alone
    assert main(["run", jobs, "-m", ckpt, "-o", str(two), "-q", "--workers", "2", "--report", str(report)]) == 2
    a, b = _lines(one), _lines(two)
    assert len(b) == len(JOBS) + 1 and len({r["id"] for r in b}) == len(b)
    assert {r["id"]: r["text"] for r in a} == {r["id"]: r["text"] for r in b}
    rep = json.loads(report.read_text())
    assert rep["timing"]["workers"] == 2 and rep["jobs"]["succeeded"] == len(JOBS) and rep["jobs"]["failed"] == 1
    assert rep["tokens"]["completion"] == sum(r["completion_tokens"] for r in b)
    # Re-running resumes as a single process does: nothing left but the bad line, which fails again.
    assert main(["run", jobs, "-m", ckpt, "-o", str(two), "-q", "--workers", "2"]) == 2
    assert len(_lines(two)) == len(JOBS) + 1
    # --workers 1 is one worker process (the path --gpus 1 takes), not the single-process run.
    lone = tmp_path / "lone.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(lone), "-q", "--workers", "1", "--report", str(report)]) == 2
    assert json.loads(report.read_text())["device"].endswith("x 1 workers")
    assert {r["id"]: r["text"] for r in _lines(lone)} == {r["id"]: r["text"] for r in a}


def _kill_a_worker(argv, out):
    """Start `argv`, kill one of its worker processes once a result is out, and wait for the run."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (not out.exists() or not out.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The driver's children are its workers and multiprocessing's resource tracker.
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no worker process left to kill"
    workers[0].kill()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("retries", [0, 2])
def test_a_killed_worker_loses_and_duplicates_nothing(ckpt, tmp_path, retries):
    long_jobs = [j | {"max_new_tokens": 40} for j in JOBS]
    jobs = _write(tmp_path / "jobs.jsonl", long_jobs)
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "sfi_cli.main", "run", jobs, "-m", ckpt, "-o", str(out), "--workers", "2",
            "--max-retries", str(retries), "--set", "decode.max_batch_size=1"]  # one job at a time: some left
    code, err = _kill_a_worker(argv, out)
    lines = _lines(out)
    assert sorted(r["id"] for r in lines) == sorted(j["id"] for j in long_jobs)  # each job exactly once
    assert "died" in err
    failed = [r for r in lines if r["finish_reason"] == "error"]
    if retries:
        assert code == 0 and not failed  # decoded again by a new worker
    else:
        assert code == 2 and failed and all("died" in r["error"] for r in failed)
        # A re-run decodes the failed ones and nothing else.
        assert subprocess.run(argv[:-4] + ["-q"], timeout=300).returncode == 0
        again = _lines(out)
        assert sorted(r["id"] for r in again) == sorted(j["id"] for j in long_jobs)
        assert all(r["finish_reason"] != "error" for r in again)


def test_ray_flag_takes_an_optional_address():
    from sfi_cli.main import _ray_default

    assert _ray_default(["run", "j.jsonl", "--ray"]) == ["run", "j.jsonl", "--ray", "local"]
    assert _ray_default(["run", "--ray", "j.jsonl"]) == ["run", "--ray", "local", "j.jsonl"]
    assert _ray_default(["run", "--ray", "-q", "j.jsonl"]) == ["run", "--ray", "local", "-q", "j.jsonl"]
    for address in ("auto", "10.0.0.5:6379", "ray://head:10001"):
        assert _ray_default(["run", "j.jsonl", "--ray", address]) == ["run", "j.jsonl", "--ray", address]


def test_ray_missing_says_how_to_install(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else object())
    out = tmp_path / "out.jsonl"
    assert main(["run", _write(tmp_path / "jobs.jsonl", JOBS[:1]), "-m", ckpt, "-o", str(out), "--ray"]) == 1
    assert "pip install 'sfi[ray]'" in capsys.readouterr().err and not out.exists()


def test_ray_cluster_out_of_reach_is_a_message(ckpt, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance at 10.9.9.9:6379.")

    monkeypatch.setattr(ray, "init", refuse)
    out = tmp_path / "out.jsonl"
    assert main(["run", _write(tmp_path / "jobs.jsonl", JOBS[:1]), "-m", ckpt, "-o", str(out), "--ray",
                 "10.9.9.9:6379"]) == 1
    err = capsys.readouterr().err
    assert "could not connect to the Ray cluster at 10.9.9.9:6379" in err and "Traceback" not in err


@pytest.mark.long
def test_ray_actors_write_what_one_process_writes_and_survive_a_killed_actor(ckpt, tmp_path):
    """A local Ray instance, two CPU actors: the same texts as one process; then one actor's process is killed
    mid-run (SIGKILL, as a lost node): its unfinished jobs are decoded again, none lost or duplicated."""
    pytest.importorskip("ray")
    jobs = _write(tmp_path / "jobs.jsonl", JOBS)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["run", jobs, "-m", ckpt, "-o", str(one), "-q"]) == 0
    assert main(["run", jobs, "-m", ckpt, "-o", str(two), "-q", "--ray", "--workers", "2"]) == 0
    assert {r["id"]: r["text"] for r in _lines(one)} == {r["id"]: r["text"] for r in _lines(two)}
    assert len(_lines(two)) == len(JOBS)

    long_jobs = _write(tmp_path / "long.jsonl", [j | {"max_new_tokens": 40} for j in JOBS])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "sfi_cli.main", "run", long_jobs, "-m", ckpt, "-o", str(out),
                             "--ray", "--workers", "2", "--set", "decode.max_batch_size=1"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (not out.exists() or not out.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    actors = [c for c in psutil.Process(proc.pid).children(recursive=True)
              if "_RayWorker" in " ".join(c.cmdline())]
    assert actors, "no actor process to kill"
    actors[0].kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "died" in err
    lines = _lines(out)
    assert sorted(r["id"] for r in lines) == sorted(j["id"] for j in JOBS)  # each job exactly once
    assert all(r["finish_reason"] != "error" for r in lines)
