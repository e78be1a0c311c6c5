"""Turn a job into prompt token ids: chat template or raw text, then fit it into the model's context.

Errors here are per job (`PromptError`): they become that job's error result, never a crash.
"""

from __future__ import annotations

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
    if job.messages is None:
        # Raw text gets the tokenizer's own special tokens (e.g. Llama's BOS), as transformers would add.
        return list(tokenizer(job.prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("the model has no chat template; send a `prompt` instead of `messages`")
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in job.messages], tokenize=False, add_generation_prompt=True, **job.chat_template_kwargs
        )
    except Exception as e:  # template errors are jinja's, raised for this job's content
        raise PromptError(f"chat template failed on these messages: {e}") from None
    # The template already holds any BOS; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
