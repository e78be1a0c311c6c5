"""Markdown tables for the README from `sfi eval --json` files (so no figure is typed by hand).

Usage: PYTHONPATH=. python bench/eval_tables.py RESULT.json [...] [--recipes 'SPEC;SPEC'] [--names 'LABEL=SPEC;...']
       PYTHONPATH=. python bench/eval_tables.py CPU.json --against GPU.json [--names 'LABEL=SPEC;...']
Prints one table: recipes down; retrieval cells as correct/trials (dense with its 95% Wilson interval, * outside
it), NLL as the change against dense, fidelity as the NLL change and the token agreement; attended at the longest
length; the recall diagnostic (mean share of dense attention mass held by fast steps, nll task, longest length).
With --against: the same cells on two devices (the second file's first n trials, n the first file's trial count).
Trial i is the same prompt in both only when both files name the same `corpus` (the prose comes from the running
Python's `pydoc_data.topics`); otherwise only the counts and means compare, and the table says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sfi.tools.eval import compare_to_dense

RETRIEVAL = ("passkey", "multikey", "vartrack", "preamble")


def load(paths: list[str]) -> list[dict]:
    rows = [c for p in paths for c in json.loads(Path(p).read_text())["cells"]]
    compare_to_dense(rows)
    return rows


def same_corpus(a: str, b: str) -> bool:
    corpora = [json.loads(Path(p).read_text()).get("corpus") for p in (a, b)]
    return corpora[0] is not None and corpora[0] == corpora[1]


def cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["task"] in RETRIEVAL:
        text = str(r["correct"])
        if r["recipe"] == "dense":
            lo, hi = r["ci95"]
            return f"{text} [{lo * r['trials']:.0f}-{hi * r['trials']:.0f}]"
        return text + (" *" if r.get("within_dense_ci") is False else "")
    if r["recipe"] == "dense":
        return f"{r['nll']:.3f}"
    text = f"{r['nll_vs_dense']:+.1%}"
    return text + (f" ({r['agreement']:.0%})" if r["task"] == "fidelity" else "")


def table(rows: list[dict], recipes: list[str], lengths: list[int], names: dict[str, str]) -> str:
    tasks = [t for t in (*RETRIEVAL, "nll", "fidelity") if any(r["task"] == t for r in rows)]
    head = [f"{t} {' / '.join(f'{n // 1024}k' for n in lengths)}" for t in tasks] + ["attended", "recall"]
    out = ["| recipe | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    longest = max(lengths)
    for recipe in recipes:
        mine = {(r["task"], r["length"]): r for r in rows if r["recipe"] == recipe}
        cells = [" / ".join(cell(mine.get((t, n))) for n in lengths) for t in tasks]
        att = [r["attended_fraction"] for (t, n), r in mine.items() if n == longest and r["attended_fraction"]]
        nll = mine.get(("nll", longest), {})
        cells += [f"{sum(att) / len(att):.1%}" if att else "-",
                  f"{nll['recall']:.1%}" if nll.get("recall") is not None else "-"]
        out.append(f"| {names.get(recipe, recipe)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def agreement(mine: list[dict], theirs: list[dict], names: dict[str, str], same_prompts: bool) -> str:
    """Per retrieval cell of `mine`: correct here, correct in `theirs` over its first trials, and (when the
    prompts are the same) the same-trial verdicts. A recipe spec of `theirs` renamed to a label in `names` is
    matched to `mine`'s recipe of that label."""
    other = {(names.get(r["recipe"], r["recipe"]), r["task"], r["length"]): r for r in theirs}
    out = ["| recipe | task | length | trials | here | there |" + (" same verdict |" if same_prompts else ""),
           "|" + " --- |" * (7 if same_prompts else 6)]
    for r in mine:
        o = other.get((r["recipe"], r["task"], r["length"]))
        if r["task"] not in RETRIEVAL or o is None:
            continue
        n = len(r["values"])
        there = o["values"][:n]
        same = sum(a == b for a, b in zip(r["values"], there, strict=True))
        out.append(f"| {r['recipe']} | {r['task']} | {r['length'] // 1024}k | {n} | {r['correct']} | "
                   f"{sum(there):.0f} |" + (f" {same}/{n} |" if same_prompts else ""))
    return "\n".join(out)


def nll_agreement(mine: list[dict], theirs: list[dict], names: dict[str, str], same_prompts: bool) -> str:
    """Per nll cell of `mine`: the mean NLL here and there over as many trials, each with its change against
    dense on its own device, and (same prompts only) the largest per-trial difference."""
    other = {(names.get(r["recipe"], r["recipe"]), r["task"], r["length"]): r for r in theirs}
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    head = "| recipe | length | trials | NLL here | NLL there |"
    head += " largest trial difference |" if same_prompts else ""
    out = [head, "|" + " --- |" * (6 if same_prompts else 5)]
    for r in mine:
        o = other.get((r["recipe"], "nll", r["length"]))
        d_here = next((x for x in mine if x["recipe"] == "dense" and x["task"] == "nll" and x["length"] == r["length"]),
                      None)
        d_there = other.get(("dense", "nll", r["length"]))
        if r["task"] != "nll" or o is None or d_here is None or d_there is None:
            continue
        n = len(r["values"])
        here, there = r["values"], o["values"][:n]
        cells = []
        for values, dense in ((here, d_here["values"]), (there, d_there["values"][:n])):
            delta = mean(values) / mean(dense) - 1
            cells.append(f"{mean(values):.3f}" + ("" if r["recipe"] == "dense" else f" ({delta:+.1%})"))
        worst = max(abs(a - b) for a, b in zip(here, there, strict=True))
        out.append(f"| {r['recipe']} | {r['length'] // 1024}k | {n} | {cells[0]} | {cells[1]} |"
                   + (f" {worst:.3f} |" if same_prompts else ""))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--recipes", help="recipe specs separated by ';', in order (default: all)")
    ap.add_argument("--names", default="", help="label=spec;label=spec to rename rows")
    ap.add_argument("--lengths", default="2048,4096,7168")
    ap.add_argument("--against", help="a second result file: compare its retrieval cells trial by trial")
    a = ap.parse_args()
    rows = load(a.results)
    names = {spec: label for label, spec in (item.split("=", 1) for item in a.names.split(";") if "=" in item)}
    if a.against:
        theirs = load([a.against])
        same = len(a.results) == 1 and same_corpus(a.results[0], a.against)
        if not same:
            print("(the two files do not name the same corpus: trial i may be a different prompt in each, so only "
                  "counts and means compare)\n")
        print(agreement(rows, theirs, names, same))
        if any(r["task"] == "nll" for r in rows):
            print()
            print(nll_agreement(rows, theirs, names, same))
        return
    recipes = a.recipes.split(";") if a.recipes else list(dict.fromkeys(r["recipe"] for r in rows))
    print(table(rows, recipes, [int(n) for n in a.lengths.split(",")], names))


if __name__ == "__main__":
    main()
