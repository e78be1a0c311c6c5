"""Read a JSONL jobs file and validate every line into a `Job`, or a `JobProblem` that says what to fix.

Two line formats are accepted, detected per line: the native one (`{"id", "prompt" | "messages", ...}`) and the
OpenAI Batch API request line that `vllm run-batch` reads (`{"custom_id", "method", "url", "body"}`).

This module is not the prompt builder (chat templates and token counts live in `prompts.py`) and it applies no
run defaults: a parameter a job does not give stays `None` in its `GenParams`. A bad line never stops the others;
only a file that cannot be read at all raises `JobInputError`.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import JobInputError

STDIN_SOURCE = "<stdin>"
_ROLES = ("system", "user", "assistant", "tool", "developer")
_MESSAGE_PASSTHROUGH = ("name", "tool_call_id", "tool_calls")
_NATIVE_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
_NATIVE_KEYS = ("id", "prompt", "messages", *_NATIVE_PARAMS, "chat_template_kwargs", "metadata")
_OPENAI_KEYS = ("custom_id", "method", "url", "body")
_OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# torch.manual_seed's accepted range; a seed outside it would fail later, mid-run, for this one job.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class GenParams:
    """A job's own generation settings; `None` means not given, so the run's default applies."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Job:
    id: str
    source: str  # file name as given, "<stdin>" for "-"
    line: int  # 1-based
    prompt: str | None  # exactly one of prompt / messages is set
    messages: tuple[dict, ...] | None  # {"role", "content": str} plus name / tool_call_id / tool_calls
    params: GenParams
    chat_template_kwargs: dict  # {} when absent
    api: str  # "sfi" (native line), "chat" (/v1/chat/completions), "completions" (/v1/completions)
    metadata: dict | None  # passed through untouched to the output


@dataclass(frozen=True)
class JobProblem:
    """One bad line. `job_id` is set when the line had a usable id, so the caller can write an error result."""

    source: str
    line: int
    field: str | None
    reason: str
    job_id: str | None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}"
        if self.field is None:
            return f"{where}: {self.reason}"
        return f"{where}: field '{self.field}': {self.reason}"


@dataclass
class JobSet:
    jobs: list[Job]
    problems: list[JobProblem]


class _Bad(Exception):
    """Raised inside the validators; `parse_jobs` turns it into a `JobProblem` for the line."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def read_jobs(path: str) -> JobSet:
    """Read and validate a jobs file; `"-"` reads standard input."""
    if path == "-":
        return parse_jobs(sys.stdin.buffer, STDIN_SOURCE)
    try:
        with open(path, "rb") as f:
            return parse_jobs(f, path)
    except OSError as e:
        raise JobInputError(f"cannot read jobs file {path}: {e.strerror or e}") from None


def parse_jobs(lines: Iterable[bytes], source: str) -> JobSet:
    """Validate raw lines (bytes, so one bad encoding spoils only its own line)."""
    jobs: list[Job] = []
    problems: list[JobProblem] = []
    first_seen: dict[str, int] = {}  # id -> line that owns it, whether or not that line was valid
    for line_no, raw in enumerate(lines, start=1):
        if line_no == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        if not raw.strip():
            continue
        job_id: str | None = None
        try:
            obj = _decode(raw)
            openai = _is_openai(obj)
            id_field = "custom_id" if openai else "id"
            job_id = _check_id(obj.get(id_field), id_field)
            if job_id in first_seen:
                # The first line owns the id (it gets the result, good or error), so this one reports no job_id.
                reason = f"duplicate id {job_id!r}; first used on line {first_seen[job_id]}"
                job_id = None
                raise _Bad(id_field, reason)
            first_seen[job_id] = line_no
            build = _openai_job if openai else _native_job
            jobs.append(build(obj, job_id, source, line_no))
        except _Bad as e:
            problems.append(JobProblem(source, line_no, e.field, e.reason, job_id))
    return JobSet(jobs, problems)


def _decode(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(None, f"not valid UTF-8 at byte {e.start + 1}") from None
    try:
        # Without its line end: an unterminated string is then reported where it starts, not at the newline.
        obj = json.loads(text.rstrip("\r\n"), parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise _Bad(None, f"malformed JSON at column {e.colno}: {e.msg.removesuffix(' at')}") from None
    if not isinstance(obj, dict):
        raise _Bad(None, f"a job line must be a JSON object, got {_json_type(obj)}")
    return obj


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN / Infinity, which are not JSON and could not be written back to the output.
    raise _Bad(None, f"malformed JSON: {name} is not a JSON value")


def _is_openai(obj: dict) -> bool:
    return any(key in obj for key in _OPENAI_KEYS)


def _check_id(value: Any, field: str) -> str:
    if value is None:
        raise _Bad(field, "missing; every job needs a unique id")
    if not isinstance(value, str) or not value.strip():
        raise _Bad(field, f"must be a non-empty string, got {_show(value)}")
    return value


def _native_job(obj: dict, job_id: str, source: str, line: int) -> Job:
    _reject_unknown(obj, _NATIVE_KEYS, prefix="")
    prompt, messages = _prompt_or_messages(obj, prefix="")
    return Job(
        id=job_id,
        source=source,
        line=line,
        prompt=prompt,
        messages=messages,
        params=_gen_params(obj, {name: name for name in _NATIVE_PARAMS}, prefix=""),
        chat_template_kwargs=_template_kwargs(obj.get("chat_template_kwargs"), "chat_template_kwargs"),
        api="sfi",
        metadata=_metadata(obj.get("metadata")),
    )


def _openai_job(obj: dict, job_id: str, source: str, line: int) -> Job:
    _reject_unknown(obj, _OPENAI_KEYS, prefix="")
    if obj.get("method") != "POST":
        raise _Bad("method", f'must be "POST", got {_show(obj.get("method"))}')
    url = obj.get("url")
    if url not in _OPENAI_URLS:
        supported = " or ".join(f'"{u}"' for u in _OPENAI_URLS)
        raise _Bad("url", f"must be {supported}, got {_show(url)}")
    api = _OPENAI_URLS[url]
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Bad("body", f"must be a JSON object, got {_show(body)}")
    _check_openai_body_options(body)
    prompt, messages = _prompt_or_messages(body, prefix="body.")
    if api == "chat" and messages is None:
        raise _Bad("body.messages", "a /v1/chat/completions request needs `messages`, not `prompt`")
    if api == "completions" and prompt is None:
        raise _Bad("body.prompt", "a /v1/completions request needs `prompt`, not `messages`")
    return Job(
        id=job_id,
        source=source,
        line=line,
        prompt=prompt,
        messages=messages,
        params=_gen_params(body, _openai_param_keys(body), prefix="body."),
        chat_template_kwargs=_template_kwargs(body.get("chat_template_kwargs"), "body.chat_template_kwargs"),
        api=api,
        metadata=None,
    )


def _check_openai_body_options(body: dict) -> None:
    # Other OpenAI body keys (model, user, logit_bias, ...) are ignored, but these two would change what the
    # caller gets back, so saying nothing would hand back something else than was asked for.
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _Bad("body.n", f"only n=1 is supported, got {_show(n)}")
    if body.get("stream") not in (None, False):
        raise _Bad("body.stream", "streaming is not supported in a batch run; drop `stream` or set it to false")


def _openai_param_keys(body: dict) -> dict[str, str]:
    """Map each GenParams name to the body key that carries it."""
    given = [key for key in ("max_tokens", "max_completion_tokens") if body.get(key) is not None]
    if len(given) > 1:
        raise _Bad("body.max_completion_tokens", "give only one of max_tokens / max_completion_tokens")
    keys = {name: name for name in _NATIVE_PARAMS if name != "max_new_tokens"}
    keys["max_new_tokens"] = given[0] if given else "max_tokens"
    return keys


def _reject_unknown(obj: dict, allowed: tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(allowed)}"
            raise _Bad(prefix + key, "unknown field" + hint)


def _prompt_or_messages(obj: dict, prefix: str) -> tuple[str | None, tuple[dict, ...] | None]:
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise _Bad(None, f"needs one of `{prefix}prompt` or `{prefix}messages`")
    if prompt is not None and messages is not None:
        raise _Bad(None, f"give only one of `{prefix}prompt` or `{prefix}messages`, not both")
    if prompt is not None:
        return _check_prompt(prompt, prefix + "prompt"), None
    return None, _check_messages(messages, prefix + "messages")


def _check_prompt(value: Any, field: str) -> str:
    if isinstance(value, list):
        raise _Bad(field, "must be a single string; a list of prompts is not supported, put one prompt per line")
    if not isinstance(value, str):
        raise _Bad(field, f"must be a string, got {_show(value)}")
    if not value.strip():
        raise _Bad(field, "is empty")
    return value


def _check_messages(value: Any, field: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad(field, f"must be a non-empty list of messages, got {_show(value)}")
    return tuple(_check_message(m, f"{field}[{i}]") for i, m in enumerate(value))


def _check_message(msg: Any, field: str) -> dict:
    if not isinstance(msg, dict):
        raise _Bad(field, f"must be an object with role and content, got {_show(msg)}")
    _reject_unknown(msg, ("role", "content", *_MESSAGE_PASSTHROUGH), prefix=field + ".")
    role = msg.get("role")
    if role not in _ROLES:
        raise _Bad(f"{field}.role", f"must be one of {', '.join(_ROLES)}; got {_show(role)}")
    content = msg.get("content")
    if content is None and role == "assistant" and msg.get("tool_calls"):
        # OpenAI sends content null on an assistant turn that only calls tools; templates expect a string.
        content = ""
    out = {"role": role, "content": _check_content(content, f"{field}.content")}
    out.update({key: msg[key] for key in _MESSAGE_PASSTHROUGH if msg.get(key) is not None})
    return out


def _check_content(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        reason = "missing" if content is None else f"must be a string or a list of text parts, got {_show(content)}"
        raise _Bad(field, reason)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise _Bad(f"{field}[{i}]", f"only text parts are supported, got {_show(kind)}")
        if not isinstance(part.get("text"), str):
            raise _Bad(f"{field}[{i}].text", f"must be a string, got {_show(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _gen_params(src: dict, keys: dict[str, str], prefix: str) -> GenParams:
    """Validate the generation parameters; `keys` maps each GenParams name to its key in `src`."""
    values = {}
    for name, key in keys.items():
        value = src.get(key)
        if value is not None:  # null means "not given", as OpenAI clients write their unset options
            values[name] = _PARAM_CHECKS[name](value, prefix + key)
    return GenParams(**values)


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is never a meant token count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _max_new_tokens(value: Any, field: str) -> int:
    if not _is_int(value) or value <= 0:
        raise _Bad(field, f"must be a positive integer, got {_show(value)}")
    return value


def _temperature(value: Any, field: str) -> float:
    if not _is_number(value) or value < 0:
        raise _Bad(field, f"must be a number >= 0, got {_show(value)}")
    return float(value)


def _top_p(value: Any, field: str) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise _Bad(field, f"must be a number in (0, 1], got {_show(value)}")
    return float(value)


def _top_k(value: Any, field: str) -> int:
    if not _is_int(value) or value < 0:
        raise _Bad(field, f"must be an integer >= 0 (0 turns it off), got {_show(value)}")
    return value


def _seed(value: Any, field: str) -> int:
    if not _is_int(value) or not _SEED_MIN <= value <= _SEED_MAX:
        raise _Bad(field, f"must be an integer that fits in 64 bits, got {_show(value)}")
    return value


def _stop(value: Any, field: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _Bad(field, f"must be a non-empty string or a list of non-empty strings, got {_show(value)}")
    return tuple(items)


_PARAM_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "max_new_tokens": _max_new_tokens,
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "seed": _seed,
    "stop": _stop,
}


def _template_kwargs(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(field, f"must be a JSON object, got {_show(value)}")
    return value


def _metadata(value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise _Bad("metadata", f"must be a JSON object, got {_show(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _show(value: Any, limit: int = 40) -> str:
    """The value as the user wrote it (JSON spelling), cut short so one problem stays one line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
