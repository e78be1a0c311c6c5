"""Write examples/jobs.jsonl: a few chat and long-document jobs built from CPython's pydoc_data prose.

Run: python examples/make_jobs.py > examples/jobs.jsonl
"""

from __future__ import annotations

import json
import random
from pydoc_data.topics import topics


def prose(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    names = sorted(topics)
    rng.shuffle(names)
    text = ""
    for name in names:
        text += topics[name].strip() + "\n\n"
        if len(text) >= n_chars:
            break
    return text[:n_chars]


def main() -> None:
    haystack = prose(6000, seed=1)
    cut = haystack.find(". ", len(haystack) // 2) + 2
    needle = "The secret passkey is 71932. Remember it. "
    jobs = [
        {"id": "capital", "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_new_tokens": 32},
        {"id": "haiku", "messages": [{"role": "system", "content": "You are a concise poet."},
                                     {"role": "user", "content": "Write a haiku about batch jobs that run at night."}],
         "max_new_tokens": 48, "temperature": 0.7, "seed": 7},
        {"id": "passkey-1.5k", "messages": [{"role": "user", "content": haystack[:cut] + needle + haystack[cut:]
                                             + "\n\nWhat is the secret passkey? Answer with the number only."}],
         "max_new_tokens": 12},
        {"id": "summary-with", "messages": [{"role": "user", "content": "Summarise in two sentences:\n\n"
                                             + topics["with"][:3000]}], "max_new_tokens": 96},
        {"id": "continue-raw", "prompt": "The three most useful built-in types in Python are", "max_new_tokens": 40,
         "stop": ["\n\n"]},
        # About 4,300 tokens: long enough that SFI engages on the default model (its budget is about 900 tokens).
        {"id": "long-doc-5k", "messages": [{"role": "user", "content": prose(17000, seed=3) + "\n\nWhich Python "
                                            "features does the text above describe? Answer in three sentences."}],
         "max_new_tokens": 128},
    ]
    for job in jobs:
        print(json.dumps(job, ensure_ascii=False))


if __name__ == "__main__":
    main()
