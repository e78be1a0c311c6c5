"""Jobs file parsing: both line formats, every validation problem with its field and line, and good lines around
bad ones still parsed."""

from __future__ import annotations

import io
import json
import sys

import pytest

from sfi.errors import JobInputError
from sfi.jobs import GenParams, JobProblem, parse_jobs, read_jobs

GOOD_BEFORE = {"id": "before", "prompt": "hello"}
GOOD_AFTER = {"id": "after", "messages": [{"role": "user", "content": "hi"}]}


def _lines(*items: object) -> list[bytes]:
    return [item if isinstance(item, bytes) else json.dumps(item).encode() + b"\n" for item in items]


def _one_problem(bad: object) -> JobProblem:
    """Parse `bad` between two good lines; it must be the only problem, on line 2, and not spoil the others."""
    result = parse_jobs(_lines(GOOD_BEFORE, bad, GOOD_AFTER), "jobs.jsonl")
    assert [j.id for j in result.jobs] == ["before", "after"]
    assert [j.line for j in result.jobs] == [1, 3]
    assert len(result.problems) == 1, result.problems
    problem = result.problems[0]
    assert (problem.source, problem.line) == ("jobs.jsonl", 2)
    return problem


def _openai(body: dict, url: str = "/v1/chat/completions", **top: object) -> dict:
    return {"custom_id": "r1", "method": "POST", "url": url, "body": body, **top}


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_native_prompt_defaults():
    (job,) = parse_jobs(_lines({"id": "a1", "prompt": "Say hi"}), "j").jobs
    assert (job.id, job.source, job.line, job.prompt, job.messages) == ("a1", "j", 1, "Say hi", None)
    assert job.params == GenParams()
    assert job.chat_template_kwargs == {}
    assert job.api == "sfi"
    assert job.metadata is None


def test_native_all_fields():
    line = {
        "id": "a",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q", "name": "bob"}],
        "max_new_tokens": 7,
        "temperature": 0,
        "top_p": 1,
        "top_k": 0,
        "seed": -5,
        "stop": "\n\n",
        "chat_template_kwargs": {"enable_thinking": False},
        "metadata": {"row": 3, "tags": ["x"]},
    }
    (job,) = parse_jobs(_lines(line), "j").jobs
    assert job.prompt is None
    assert job.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "q", "name": "bob"})
    assert job.params == GenParams(max_new_tokens=7, temperature=0.0, top_p=1.0, top_k=0, seed=-5, stop=("\n\n",))
    assert isinstance(job.params.temperature, float)
    assert job.chat_template_kwargs == {"enable_thinking": False}
    assert job.metadata == {"row": 3, "tags": ["x"]}


def test_blank_lines_skipped_and_line_numbers_kept():
    result = parse_jobs([b"\n", b"   \r\n", json.dumps(GOOD_BEFORE).encode(), b"", b"{bad\n"], "j")
    assert [(j.id, j.line) for j in result.jobs] == [("before", 3)]
    assert [p.line for p in result.problems] == [5]


def test_crlf_and_bom():
    result = parse_jobs([b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\r\n'], "j")
    assert [j.id for j in result.jobs] == ["a"] and not result.problems


def test_malformed_json():
    problem = _one_problem(b'{"id": "x" "prompt": "p"}\n')
    assert problem.field is None and problem.job_id is None
    assert problem.reason == "malformed JSON at column 12: Expecting ',' delimiter"
    assert str(problem).startswith("jobs.jsonl:2: malformed JSON at column 12")


def test_unterminated_string_is_reported_where_it_starts():
    """Not at the line's newline ("Invalid control character" at the last column)."""
    problem = _one_problem(b'{"id": "x", "prompt": "never closed}\r\n')
    assert problem.reason == "malformed JSON at column 23: Unterminated string starting"


def test_nan_is_not_json():
    problem = _one_problem(b'{"id": "x", "prompt": "p", "temperature": NaN}\n')
    assert "NaN" in problem.reason


@pytest.mark.parametrize("line", [b"[1, 2]\n", b'"text"\n', b"3\n", b"null\n"])
def test_not_an_object(line):
    problem = _one_problem(line)
    assert problem.field is None and "JSON object" in problem.reason


def test_not_utf8():
    problem = _one_problem(b'{"id": "x", "prompt": "caf\xe9"}\n')
    assert problem.reason == "not valid UTF-8 at byte 27"  # 1-based, like the JSON column
    assert problem.job_id is None


def test_missing_id():
    problem = _one_problem({"prompt": "p"})
    assert problem.field == "id" and "missing" in problem.reason and problem.job_id is None


@pytest.mark.parametrize("bad_id", [3, "", "  ", None, ["a"], True])
def test_bad_id(bad_id):
    problem = _one_problem({"id": bad_id, "prompt": "p"})
    assert problem.field == "id" and problem.job_id is None


def test_duplicate_id():
    result = parse_jobs(_lines({"id": "a", "prompt": "1"}, GOOD_BEFORE, {"id": "a", "prompt": "2"}), "j")
    assert [j.prompt for j in result.jobs if j.id == "a"] == ["1"]
    (problem,) = result.problems
    assert (problem.line, problem.field, problem.job_id) == (3, "id", None)
    assert "line 1" in problem.reason


def test_duplicate_of_a_bad_line_is_still_a_duplicate():
    # The first line owns the id (the caller writes its error result), so a second "a" must not also run.
    result = parse_jobs(_lines({"id": "a", "prompt": ""}, {"id": "a", "prompt": "ok"}), "j")
    assert result.jobs == []
    assert [(p.line, p.job_id) for p in result.problems] == [(1, "a"), (2, None)]


def test_problem_keeps_job_id_for_error_result():
    problem = _one_problem({"id": "x9", "prompt": "p", "max_new_tokens": -3})
    assert problem.job_id == "x9"
    assert str(problem) == "jobs.jsonl:2: field 'max_new_tokens': must be a positive integer, got -3"


def test_neither_prompt_nor_messages():
    problem = _one_problem({"id": "x"})
    assert "prompt" in problem.reason and "messages" in problem.reason and problem.job_id == "x"


def test_both_prompt_and_messages():
    problem = _one_problem({"id": "x", "prompt": "p", "messages": [{"role": "user", "content": "c"}]})
    assert "not both" in problem.reason


@pytest.mark.parametrize("prompt", ["", "  \n\t", 5, {"text": "p"}])
def test_bad_prompt(prompt):
    assert _one_problem({"id": "x", "prompt": prompt}).field == "prompt"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("hello", "messages"),
        (["hello"], "messages[0]"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "messages[1].role"),
        ([{"content": "b"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": "a", "contnet": "b"}], "messages[0].contnet"),
    ],
)
def test_bad_messages(messages, field):
    assert _one_problem({"id": "x", "messages": messages}).field == field


def test_content_parts_joined_and_tool_fields_passed():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    ]
    (job,) = parse_jobs(_lines({"id": "x", "messages": messages}), "j").jobs
    assert job.messages == (
        {"role": "developer", "content": "ab"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "t1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", True),
        ("max_new_tokens", "10"),
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("temperature", False),
        ("top_p", 0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("top_k", 2.0),
        ("seed", 1.0),
        ("seed", True),
        ("seed", 2**64),
        ("stop", ""),
        ("stop", ["a", ""]),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("chat_template_kwargs", ["enable_thinking"]),
        ("metadata", "note"),
        ("metadata", [1]),
    ],
)
def test_bad_native_params(key, value):
    problem = _one_problem({"id": "x", "prompt": "p", key: value})
    assert problem.field == key and problem.job_id == "x"


def test_stop_list():
    (job,) = parse_jobs(_lines({"id": "x", "prompt": "p", "stop": ["a", "bc"]}), "j").jobs
    assert job.params.stop == ("a", "bc")


def test_unknown_field_suggests_close_match():
    problem = _one_problem({"id": "x", "prompt": "p", "max_tokens": 5})
    assert problem.field == "max_tokens"
    assert "did you mean 'max_new_tokens'" in problem.reason


def test_unknown_field_without_match_lists_known():
    problem = _one_problem({"id": "x", "prompt": "p", "zzzz": 1})
    assert problem.field == "zzzz" and "known fields" in problem.reason


def test_openai_chat_line():
    body = {
        **CHAT,
        "max_completion_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 1,
        "stop": ["END"],
        "chat_template_kwargs": {"enable_thinking": False},
        "n": 1,
        "stream": False,
        "presence_penalty": 0.5,
        "user": "me",
        "logprobs": None,
    }
    (job,) = parse_jobs(_lines(_openai(body)), "b.jsonl").jobs
    assert (job.id, job.api, job.prompt, job.metadata) == ("r1", "chat", None, None)
    assert job.messages == ({"role": "user", "content": "hi"},)
    assert job.params == GenParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, seed=1, stop=("END",))
    assert job.chat_template_kwargs == {"enable_thinking": False}


def test_openai_completions_line_with_nulls():
    body = {"model": "m", "prompt": "Once", "max_tokens": 5, "temperature": None, "stop": None}
    (job,) = parse_jobs(_lines(_openai(body, url="/v1/completions")), "b").jobs
    assert (job.api, job.prompt, job.messages) == ("completions", "Once", None)
    assert job.params == GenParams(max_new_tokens=5)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}, "custom_id"),
        (_openai(CHAT, method="GET"), "method"),
        ({"custom_id": "r1", "url": "/v1/chat/completions", "body": CHAT}, "method"),
        (_openai(CHAT, url="/v1/embeddings"), "url"),
        (_openai("text"), "body"),
        (_openai({**CHAT, "n": 2}), "body.n"),
        (_openai({**CHAT, "stream": True}), "body.stream"),
        (_openai({**CHAT, "max_tokens": 0}), "body.max_tokens"),
        (_openai({**CHAT, "max_completion_tokens": "5"}), "body.max_completion_tokens"),
        (_openai({**CHAT, "max_tokens": 5, "max_completion_tokens": 5}), "body.max_completion_tokens"),
        (_openai({**CHAT, "temperature": -1}), "body.temperature"),
        (_openai({**CHAT, "top_k": -2}), "body.top_k"),
        (_openai({**CHAT, "chat_template_kwargs": 1}), "body.chat_template_kwargs"),
        (_openai({"prompt": "p"}), "body.messages"),
        (_openai({"messages": [{"role": "user", "content": "x"}]}, url="/v1/completions"), "body.prompt"),
        (_openai({"prompt": ["a", "b"]}, url="/v1/completions"), "body.prompt"),
        (_openai({"prompt": [1, 2, 3]}, url="/v1/completions"), "body.prompt"),
        (_openai({"messages": [{"role": "bot", "content": "x"}]}), "body.messages[0].role"),
        (_openai(CHAT, extra=1), "extra"),
    ],
)
def test_bad_openai_lines(line, field):
    problem = _one_problem(line)
    assert problem.field == field
    assert problem.job_id == (None if field == "custom_id" else "r1")


def test_openai_url_problem_names_both():
    reason = _one_problem(_openai(CHAT, url="/v1/embeddings")).reason
    assert "/v1/chat/completions" in reason and "/v1/completions" in reason


def test_openai_prompt_list_says_one_per_line():
    reason = _one_problem(_openai({"prompt": ["a", "b"]}, url="/v1/completions")).reason
    assert "one prompt per line" in reason


def test_formats_mix_and_share_ids():
    result = parse_jobs(_lines({"id": "r1", "prompt": "p"}, _openai(CHAT)), "j")
    assert [j.api for j in result.jobs] == ["sfi"]
    assert result.problems[0].field == "custom_id" and "line 1" in result.problems[0].reason


def test_read_jobs_file(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"".join(_lines(GOOD_BEFORE, {"id": 1}, GOOD_AFTER)))
    result = read_jobs(str(path))
    assert [j.id for j in result.jobs] == ["before", "after"]
    assert result.jobs[0].source == str(path)
    assert str(result.problems[0]).startswith(f"{path}:2: field 'id'")


def test_read_jobs_stdin(monkeypatch):
    data = b"".join(_lines(GOOD_BEFORE, b"{oops\n"))
    monkeypatch.setattr(sys, "stdin", type("FakeStdin", (), {"buffer": io.BytesIO(data)})())
    result = read_jobs("-")
    assert [(j.id, j.source) for j in result.jobs] == [("before", "<stdin>")]
    assert [(p.source, p.line) for p in result.problems] == [("<stdin>", 2)]


def test_read_jobs_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(JobInputError, match="nope.jsonl"):
        read_jobs(str(missing))


def test_read_jobs_directory(tmp_path):
    with pytest.raises(JobInputError, match=str(tmp_path)):
        read_jobs(str(tmp_path))
