"""Result records (sfi and OpenAI Batch output) and the writer: lock, resume after a kill, overwrite, refusal of
files that are not results."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sfi.errors import ConfigError, OutputError
from sfi.results import JobResult, ResultWriter, check_writable, is_stream, openai_record, sfi_record, write_whole


def _ok(job_id: str, **kw: object) -> JobResult:
    return JobResult(id=job_id, text=f"out {job_id}", finish_reason="stop", completion_tokens=4, **kw)


def _failed(job_id: str) -> JobResult:
    return JobResult(id=job_id, text="", finish_reason="error", error="prompt too long")


def _read(path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def test_decode_tok_s():
    assert _ok("a", decode_s=2.0).decode_tok_s == 2.0
    assert _ok("a").decode_tok_s == 0.0


def test_sfi_record():
    r = JobResult(
        id="a",
        text="hé",
        finish_reason="length",
        prompt_tokens=10,
        completion_tokens=3,
        queue_s=0.123456,
        prefill_s=1.0,
        decode_s=0.3,
        model="smol",
        metadata={"k": 1},
        extra={"sfi": {"slow_steps": 2}},
    )
    assert sfi_record(r) == {
        "id": "a",
        "text": "hé",
        "finish_reason": "length",
        "error": None,
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "model": "smol",
        "timing": {"queue_s": 0.1235, "prefill_s": 1.0, "decode_s": 0.3, "decode_tok_s": 10.0},
        "metadata": {"k": 1},
        "sfi": {"slow_steps": 2},
    }
    assert "metadata" not in sfi_record(_ok("b"))


def test_openai_record_chat():
    r = JobResult(id="r1", text="hi", finish_reason="stop", prompt_tokens=5, completion_tokens=2, api="chat", model="m")
    rec = openai_record(r)
    assert set(rec) == {"id", "custom_id", "response", "error"}
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", rec["id"])
    assert rec["custom_id"] == "r1" and rec["error"] is None
    response = rec["response"]
    assert response["status_code"] == 200 and re.fullmatch(r"sfi-[0-9a-f]{32}", response["request_id"])
    body = response["body"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "m"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert openai_record(r)["id"] != rec["id"]  # fresh ids per line


def test_openai_record_completions_and_sfi_api():
    body = openai_record(_ok("c", api="completions"))["response"]["body"]
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "out c", "finish_reason": "stop", "logprobs": None}]
    assert openai_record(_ok("s"))["response"]["body"]["object"] == "chat.completion"


def test_openai_record_error():
    rec = openai_record(_failed("r2"))
    assert rec["custom_id"] == "r2" and rec["response"] is None
    assert rec["error"] == {"code": "sfi_error", "message": "prompt too long"}


def test_unknown_format():
    with pytest.raises(ConfigError, match="csv"):
        ResultWriter("x.jsonl", fmt="csv")


@pytest.mark.parametrize("fmt", ["sfi", "openai"])
def test_resume_after_kill(tmp_path, fmt):
    out = tmp_path / "deep" / "dir" / "out.jsonl"  # parents are created
    with ResultWriter(str(out), fmt=fmt) as w:
        assert w.finished_ids == set()
        for r in (_ok("a"), _failed("b"), _ok("c"), _failed("d")):
            w.write(r)
    assert len(_read(out)) == 4
    with open(out, "ab") as f:  # a run killed in the middle of a line
        f.write(b'{"id": "e", "text": "hal')

    with ResultWriter(str(out), fmt=fmt) as w:
        assert w.finished_ids == {"a", "c"}
        # The failed and torn lines are gone before anything new is written.
        assert len(_read(out)) == 2
        w.write(_ok("b"))
        w.write(_failed("d"))
        w.write(_ok("e"))
    id_key = "custom_id" if fmt == "openai" else "id"
    assert [rec[id_key] for rec in _read(out)] == ["a", "c", "b", "d", "e"]

    with ResultWriter(str(out), fmt=fmt) as w:
        assert w.finished_ids == {"a", "b", "c", "e"}
        w.write(_ok("d"))
    ids = [rec[id_key] for rec in _read(out)]
    assert sorted(ids) == ["a", "b", "c", "d", "e"]  # each id exactly once


def test_resume_drops_invalid_last_line_with_newline(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(sfi_record(_ok("a"))) + "\n" + '{"id": "b", "te\n')
    with ResultWriter(str(out)) as w:
        assert w.finished_ids == {"a"}
    assert [rec["id"] for rec in _read(out)] == ["a"]


def test_resume_keeps_file_untouched_when_clean(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(str(out)) as w:
        w.write(_ok("a"))
    before = os.stat(out).st_ino
    with ResultWriter(str(out)) as w:
        assert w.finished_ids == {"a"}
    assert os.stat(out).st_ino == before  # no needless rewrite


def test_rewrite_keeps_permissions(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(str(out)) as w:
        w.write(_failed("a"))
    os.chmod(out, 0o640)
    with ResultWriter(str(out)):
        pass
    assert os.stat(out).st_mode & 0o777 == 0o640
    assert out.read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no temp file or lock left behind


def test_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("not results at all\n")
    with ResultWriter(str(out), overwrite=True) as w:
        assert w.finished_ids == set()
        w.write(_ok("z"))
    assert [rec["id"] for rec in _read(out)] == ["z"]


@pytest.mark.parametrize(
    "content",
    [
        '{"name": "a config"}\n{"name": "b"}\n',
        "plain text\n" + json.dumps(sfi_record(_ok("a"))) + "\n",
        json.dumps(openai_record(_ok("a"))) + "\n",  # an openai output read as sfi
    ],
)
def test_refuses_file_that_is_not_results(tmp_path, content):
    out = tmp_path / "data.jsonl"
    out.write_text(content)
    with pytest.raises(OutputError, match=r"data\.jsonl:1 .*--overwrite"), ResultWriter(str(out)):
        pass
    assert out.read_text() == content  # left untouched
    assert not (tmp_path / "data.jsonl.lock").exists()


def test_refuses_sfi_output_as_openai(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(str(out)) as w:
        w.write(_ok("a"))
    with pytest.raises(OutputError, match="openai"), ResultWriter(str(out), fmt="openai"):
        pass


def test_second_writer_same_process_is_locked_out(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(str(out)) as w:
        lock = tmp_path / "out.jsonl.lock"
        assert lock.read_text().strip() == str(os.getpid())
        busy = rf"another sfi run \(pid {os.getpid()}\) is writing .*out\.jsonl"
        with pytest.raises(OutputError, match=busy), ResultWriter(str(out)):
            pass
        w.write(_ok("a"))  # the first writer is unaffected
    assert not lock.exists()
    assert [rec["id"] for rec in _read(out)] == ["a"]
    with ResultWriter(str(out)) as w:  # and the path is free again
        assert w.finished_ids == {"a"}


def test_lock_held_by_other_process(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from sfi.results import ResultWriter
        with ResultWriter({str(out)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
        """
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=rf"pid {proc.pid}"), ResultWriter(str(out)):
            pass
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0
    assert not (tmp_path / "out.jsonl.lock").exists()
    with ResultWriter(str(out)):
        pass


def test_lock_retries_when_lock_file_was_unlinked(tmp_path, monkeypatch):
    # A finishing run unlinks its lock file while we wait between open and flock: the lock we then get is on an
    # orphan file, so the writer must reopen the path and lock again.
    out = tmp_path / "out.jsonl"
    lock = tmp_path / "out.jsonl.lock"
    real_flock = fcntl.flock
    calls = []

    def flock_after_unlink(fd, op):
        calls.append(op)
        if len(calls) == 1:
            os.unlink(lock)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_unlink)
    with ResultWriter(str(out)):
        assert len(calls) == 2
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_stale_lock_file_is_taken_over(tmp_path):
    # A run killed with SIGKILL leaves its lock file behind, but no flock: the next run must not be blocked.
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.lock").write_text("999999\n")
    with ResultWriter(str(out)) as w:
        w.write(_ok("a"))
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_unopenable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file/sub"), ResultWriter(str(blocker / "sub" / "out.jsonl")):
        pass
    directory = tmp_path / "adir"
    directory.mkdir()
    with pytest.raises(OutputError, match="adir"), ResultWriter(str(directory)):
        pass


def test_write_outside_with_is_a_bug(tmp_path):
    with pytest.raises(RuntimeError):
        ResultWriter(str(tmp_path / "o.jsonl")).write(_ok("a"))


@pytest.mark.parametrize("path", [None, "-"])
def test_stdout(capsys, path, tmp_path):
    with ResultWriter(path, fmt="openai") as w:
        assert w.finished_ids == set()
        w.write(_ok("a"))
        w.write(_failed("b"))
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["a", "b"]
    assert os.listdir(tmp_path) == []


def test_line_is_utf8_and_unicode_safe(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(str(out)) as w:
        w.write(JobResult(id="a", text="naïve 日本", finish_reason="stop"))
        w.write(JobResult(id="b", text="cut \ud800", finish_reason="stop"))  # lone surrogate from a cut decode
    data = out.read_bytes()
    assert "naïve 日本".encode() in data
    assert [rec["text"] for rec in _read(out)] == ["naïve 日本", "cut \ud800"]


def test_nan_timing_is_refused(tmp_path):
    with ResultWriter(str(tmp_path / "o.jsonl")) as w, pytest.raises(ValueError):
        w.write(_ok("a", decode_s=float("nan")))


def test_output_is_created_with_the_first_line_only(tmp_path):
    """A run that fails before any result (a model that will not load) leaves no empty output behind."""
    out = tmp_path / "sub" / "out.jsonl"
    with ResultWriter(str(out)):
        assert (tmp_path / "sub" / "out.jsonl.lock").exists()
    assert not out.exists() and not (tmp_path / "sub" / "out.jsonl.lock").exists()
    with ResultWriter(str(out)) as w:
        w.write(_ok("a"))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]


def test_devices_are_streams_without_lock_or_resume(tmp_path):
    """/dev/null is written (no /dev/null.lock, nothing read back); /dev/full fails with a message, not a hang."""
    assert is_stream("/dev/null") and is_stream("-") and is_stream("/dev/stdout")
    assert not is_stream(str(tmp_path / "new.jsonl"))
    with pytest.raises(OutputError, match="is a directory"):
        is_stream(str(tmp_path))
    with ResultWriter("/dev/null") as w:
        assert w.finished_ids == set()
        w.write(_ok("a"))
    assert not os.path.exists("/dev/null.lock")
    with pytest.raises(OutputError, match="cannot write to /dev/full: No space left on device"), \
            ResultWriter("/dev/full") as w:
        w.write(_ok("a"))


def test_fifo_is_streamed(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen([sys.executable, "-c", f"print(open({str(fifo)!r}).read(), end='')"],
                              stdout=subprocess.PIPE, text=True)
    with ResultWriter(str(fifo)) as w:
        w.write(_ok("a"))
        w.write(_failed("b"))
    out, _ = reader.communicate(timeout=30)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["a", "b"]
    assert not (tmp_path / "pipe.lock").exists()


def test_whole_files_respect_the_umask_like_results(tmp_path):
    old = os.umask(0o027)
    try:
        write_whole(str(tmp_path / "report.json"), b"{}\n")
        with ResultWriter(str(tmp_path / "out.jsonl")) as w:
            w.write(_ok("a"))
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o640


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "new" / "report.json"))  # creates the folder, leaves no file
    assert list((tmp_path / "new").iterdir()) == []
    check_writable("/dev/null")
    check_writable("-")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file/report.json"):
        check_writable(str(blocker / "report.json"))
