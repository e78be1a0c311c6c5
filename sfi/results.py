"""Job results and the one writer of the output JSONL (sfi format, or the OpenAI Batch output that `vllm run-batch`
writes).

The writer is built for unattended runs that may be killed at any moment: one exclusive lock per output, each line
appended with a single unbuffered `os.write`, and on resume a torn last line or failed results are dropped by an
atomic rewrite, so a retried job ends with exactly one line. Resume, locking and fsync apply to regular files
only: `-`, `/dev/stdout`, `/dev/null`, a pipe or any other non-regular path is written as a stream. A regular
output file is created with the first line, so a run that fails before any result leaves no empty file. This
module does not decide what to retry (the caller skips `finished_ids`) and does not compute timings.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, OutputError

FORMATS = ("sfi", "openai")
_ROUND = 4  # decimals kept for timings: 0.1 ms is finer than anything we measure per job


@dataclass
class JobResult:
    id: str
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0  # from the run's start until the job's prefill began
    prefill_s: float = 0.0
    decode_s: float = 0.0
    api: str = "sfi"  # from Job.api; picks a chat or a completion body in openai output
    model: str = ""
    metadata: dict | None = None
    extra: dict = field(default_factory=dict)  # extra top-level keys of the sfi-format line

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


def sfi_record(r: JobResult) -> dict:
    record: dict[str, Any] = {
        "id": r.id,
        "text": r.text,
        "finish_reason": r.finish_reason,
        "error": r.error,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "model": r.model,
        "timing": {
            "queue_s": round(r.queue_s, _ROUND),
            "prefill_s": round(r.prefill_s, _ROUND),
            "decode_s": round(r.decode_s, _ROUND),
            "decode_tok_s": round(r.decode_tok_s, _ROUND),
        },
    }
    if r.metadata is not None:
        record["metadata"] = r.metadata
    record.update(r.extra)
    return record


def openai_record(r: JobResult) -> dict:
    """The OpenAI Batch output line for `r`, shaped as `vllm run-batch` writes it."""
    record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": r.id}
    if r.finish_reason == "error":
        record["response"] = None
        record["error"] = {"code": "sfi_error", "message": r.error or "unknown error"}
        return record
    record["response"] = {"status_code": 200, "request_id": f"sfi-{uuid.uuid4().hex}", "body": _openai_body(r)}
    record["error"] = None
    return record


def _openai_body(r: JobResult) -> dict:
    usage = {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }
    if r.api == "completions":
        kind, prefix, choice = "text_completion", "cmpl", {"index": 0, "text": r.text}
    else:
        kind, prefix = "chat.completion", "chatcmpl"
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}}
    choice.update(finish_reason=r.finish_reason, logprobs=None)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": r.model,
        "choices": [choice],
        "usage": usage,
    }


_RECORDS = {"sfi": sfi_record, "openai": openai_record}


class ResultWriter:
    """The only writer of the output. Use as a context manager: entering locks the file and resumes it.

    `finished_ids` (filled on enter) holds the ids that already succeeded in an existing output; the caller skips
    them. Path None or "-" writes to standard output; any path that is not a regular file is a stream (no lock,
    no resume, no fsync).
    """

    def __init__(self, path: str | None, fmt: str = "sfi", overwrite: bool = False) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.path = None if path in (None, "-") else path
        self.stream = self.path is None or is_stream(self.path)
        self.fmt = fmt
        self.overwrite = overwrite
        self.finished_ids: set[str] = set()
        self._record = _RECORDS[fmt]
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._flags = os.O_WRONLY | os.O_APPEND
        self._entered = False

    @property
    def name(self) -> str:
        return self.path or "standard output"

    def __enter__(self) -> ResultWriter:
        self._entered = True
        if self.stream:
            return self
        try:
            _make_parent(self.path)
            self._lock_fd = _take_lock(self.path)
            self._flags |= os.O_CREAT
            if self.overwrite:
                self._flags |= os.O_TRUNC
            else:
                self.finished_ids = _resume(self.path, self.fmt)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered = False
        self._close()

    def write(self, result: JobResult) -> None:
        """Append one result; once this returns its line is complete in the file."""
        if not self._entered:
            raise RuntimeError("ResultWriter.write called outside its `with` block")
        line = _dump(self._record(result))
        std = _std_stream(self.path)
        try:
            if std is not None:  # through Python's own stream, so that whoever captures it sees the lines
                std.buffer.write(line)
                std.flush()
                return
            if self._fd is None:
                self._fd = _open(self.path, self._flags)
            view = memoryview(line)
            while view:  # os.write may write less than asked (full disk, signals); finish the line
                view = view[os.write(self._fd, view) :]
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write to {self.name}: {e.strerror or e}") from None

    def _close(self) -> None:
        if self._fd is not None:
            try:
                if not self.stream:
                    os.fsync(self._fd)  # the lines survive a kill already; this makes them survive a power cut
            finally:
                os.close(self._fd)
                self._fd = None
        if self._lock_fd is not None:
            # Unlink while still holding the lock: a run waiting on this file then sees it gone and retries.
            try:
                os.unlink(_lock_path(self.path))
            except FileNotFoundError:
                pass
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None


_STD_PATHS = {"/dev/stdout": 1, "/dev/fd/1": 1, "/proc/self/fd/1": 1, "/dev/stderr": 2, "/dev/fd/2": 2,
              "/proc/self/fd/2": 2}


def _std_fd(path: str | None) -> int | None:
    """The descriptor a path names directly (None and "-": standard output), or None for any other path."""
    return 1 if path in (None, "-") else _STD_PATHS.get(path)


def _std_stream(path: str | None):
    """sys.stdout or sys.stderr for the paths that name them, else None."""
    return {1: sys.stdout, 2: sys.stderr}.get(_std_fd(path))


def is_stream(path: str) -> bool:
    """True for paths written as a stream: `-`, the process's own descriptors, and anything that exists and is
    not a regular file (character devices such as /dev/null, pipes, sockets)."""
    if path == "-" or path in _STD_PATHS or path.startswith(("/dev/fd/", "/proc/self/fd/")):
        return True
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise OutputError(f"cannot use {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path} is a directory; name a file to write")
    return not stat.S_ISREG(mode)


def check_writable(path: str | None) -> None:
    """Raise OutputError unless `path` can be written: run before the model loads, so a typo costs a second,
    not a whole run. A regular file's directory is created if missing and checked by creating a file in it."""
    if path in (None, "-") or _std_fd(path) is not None:
        return
    if is_stream(path):
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write to {path}: permission denied")
        return
    _make_parent(path)
    try:
        if os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        else:
            fd, probe = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".sfi-probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to {path}: {e.strerror or e}") from None


def _file_mode() -> int:
    """What open(2) would give a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_whole(path: str, data: bytes) -> None:
    """Write a whole file (a report, a JSON result): to a stream as is; a regular file atomically, with the mode
    a new file gets (umask respected), so a kill leaves either the old file or the new one."""
    std = _std_stream(path)
    if std is not None:
        std.buffer.write(data)
        std.flush()
        return
    if is_stream(path):
        target = _open(path, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(target, view) :]
        except OSError as e:
            raise OutputError(f"cannot write to {path}: {e.strerror or e}") from None
        finally:
            os.close(target)
        return
    _make_parent(path)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = _file_mode()
    except OSError as e:
        raise OutputError(f"cannot write to {path}: {e.strerror or e}") from None
    _atomic_write(path, data, mode)


def _dump(record: dict) -> bytes:
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (e.g. from a cut-off decode) cannot be UTF-8; \u escapes keep the line valid JSON.
        return (json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _lock_path(path: str) -> str:
    return path + ".lock"


def _make_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the directory of {path}: {e.strerror or e}") from None


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags, 0o666)  # less the umask, as for any new file
    except OSError as e:
        raise OutputError(f"cannot open {path}: {e.strerror or e}") from None


def _take_lock(path: str) -> int:
    """Hold an exclusive flock on `<path>.lock` and return its fd, or raise if another run holds it."""
    lock_path = _lock_path(path)
    while True:
        fd = _open(lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"another sfi run (pid {pid})" if pid.isdigit() else "another sfi run"
            raise OutputError(f"{who} is writing {path}; wait for it or choose another --output") from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {lock_path}: {e.strerror or e}") from None
        # A finishing run unlinks the lock file while holding it; if that happened between our open and our flock,
        # we now hold a lock on a file nobody else will open. Only a lock on the file at the path counts.
        try:
            here = os.stat(lock_path)
        except FileNotFoundError:
            here = None
        held = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (held.st_ino, held.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _resume(path: str, fmt: str) -> set[str]:
    """Read an existing output: keep succeeded lines, drop a torn tail and failed lines; return the finished ids."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise OutputError(f"cannot read existing output {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    # After a complete last line split() leaves b""; anything else is a line a killed run did not finish.
    changed = lines.pop() != b""
    kept: list[bytes] = []
    finished: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw) if raw.strip() else None
        except ValueError:
            if number == len(lines):  # a last line that is not JSON is torn too
                changed = True
                continue
            raise _not_results(path, number, fmt) from None
        if record is None:  # blank line: nothing to keep
            changed = True
            continue
        job_id = _record_id(record, fmt)
        if job_id is None:
            raise _not_results(path, number, fmt)
        if _succeeded(record, fmt) and job_id not in finished:
            kept.append(raw)
            finished.add(job_id)
        else:  # a failed result is dropped so that its retry leaves exactly one line for the id
            changed = True
    if changed:
        _replace(path, b"".join(line + b"\n" for line in kept))
    return finished


def _not_results(path: str, number: int, fmt: str) -> OutputError:
    return OutputError(
        f"{path}:{number} is not an sfi result line ({fmt} format), so {path} is not this run's output; "
        "pass --overwrite to replace it, or choose another --output"
    )


def _record_id(record: Any, fmt: str) -> str | None:
    """The job id of a result line of format `fmt`, or None if the line is not one."""
    if not isinstance(record, dict):
        return None
    if fmt == "openai":
        ok = isinstance(record.get("custom_id"), str) and "response" in record and "error" in record
        return record["custom_id"] if ok else None
    # An openai line has an "id" too (batch_req_...); custom_id tells the two apart.
    ok = isinstance(record.get("id"), str) and "finish_reason" in record and "custom_id" not in record
    return record["id"] if ok else None


def _succeeded(record: dict, fmt: str) -> bool:
    if fmt == "openai":
        response = record.get("response")
        return record.get("error") is None and isinstance(response, dict) and response.get("status_code") == 200
    return record.get("finish_reason") != "error"


def _replace(path: str, data: bytes) -> None:
    """Atomically replace `path` with `data`, keeping the permissions the user's file had."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError as e:
        raise OutputError(f"cannot rewrite {path}: {e.strerror or e}") from None
    _atomic_write(path, data, mode)


def _atomic_write(path: str, data: bytes, mode: int) -> None:
    """`path` holds `data` afterwards (with `mode`); a kill at any moment leaves either the old or the new file."""
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        try:
            os.fchmod(fd, mode)  # mkstemp makes 0600
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
