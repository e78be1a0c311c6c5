"""Turn a job into prompt token ids: chat template or raw text, then fit it into the model's context.

Errors here are per job (`PromptError`): they become that job's error result, never a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .jobs import Job


class PromptError(Exception):
    """This job's prompt cannot be used; the message goes into its error result."""


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_new_tokens: int  # possibly lowered so that prompt + completion fit the context
    truncated_from: int | None  # original length when --truncate cut the prompt


def render(job: Job, tokenizer: Any) -> list[int]:
    """One job's prompt token ids (`render_many` of one job; PromptError when it cannot be rendered)."""
    out = render_many([job], tokenizer)[0]
    if isinstance(out, PromptError):
        raise out
    return out


def render_many(jobs: Sequence[Job], tokenizer: Any) -> list[list[int] | PromptError]:
    """Each job's prompt token ids, or its PromptError. Chat templates render one job at a time (Python); the
    texts are then tokenized in two batches, which a fast tokenizer spreads over the CPU's cores (a batch of long
    documents tokenizes several times faster than one text at a time, with the same ids)."""
    out: list[list[int] | PromptError] = [PromptError("not rendered")] * len(jobs)
    raw: list[tuple[int, str]] = []  # raw text gets the tokenizer's own special tokens (e.g. Llama's BOS)
    templated: list[tuple[int, str]] = []  # the template already holds any BOS: adding it again would double it
    for i, job in enumerate(jobs):
        if job.messages is None:
            raw.append((i, job.prompt))
        elif not getattr(tokenizer, "chat_template", None):
            out[i] = PromptError("the model has no chat template; send a `prompt` instead of `messages`")
        else:
            try:
                templated.append((i, tokenizer.apply_chat_template(
                    [dict(m) for m in job.messages], tokenize=False, add_generation_prompt=True,
                    **job.chat_template_kwargs)))
            except Exception as e:  # template errors are jinja's, raised for this job's content
                out[i] = PromptError(f"chat template failed on these messages: {e}")
    for texts, special in ((raw, True), (templated, False)):
        if texts:
            ids = tokenizer([t for _, t in texts], add_special_tokens=special)["input_ids"]
            for (i, _), row in zip(texts, ids, strict=True):
                out[i] = list(row)
    return out


def fit(ids: list[int], max_new_tokens: int, context: int, truncate: str | None) -> Prompt:
    """Fit prompt + completion into `context` tokens.

    Without truncation a prompt that leaves no room for a single new token is an error, and a completion
    that would run past the context is capped (its finish_reason will be "length"). With truncate
    "left" (keep the end) or "middle" (keep both ends), the prompt is cut to leave room for max_new_tokens.
    """
    n = len(ids)
    if n == 0:
        raise PromptError("the prompt is empty after tokenisation")
    if n + max_new_tokens <= context:
        return Prompt(ids, max_new_tokens, None)
    if truncate is None:
        if n >= context:
            raise PromptError(f"prompt is {n} tokens, the model's context is {context}; shorten it or pass "
                              "--truncate left|middle")
        return Prompt(ids, context - n, None)
    keep = max(context - max_new_tokens, 1)
    room = context - keep
    if truncate == "left":
        return Prompt(ids[n - keep:], room, n)
    head = keep // 2
    return Prompt(ids[:head] + ids[n - (keep - head):], room, n)
