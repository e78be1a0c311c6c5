"""Markdown tables for the README from `sfi eval --json` files (so no figure is typed by hand).

Usage: PYTHONPATH=. python bench/eval_tables.py RESULT.json [...] [--recipes 'SPEC;SPEC'] [--names 'LABEL=SPEC;...']
       PYTHONPATH=. python bench/eval_tables.py CPU.json --against GPU.json [--names 'LABEL=SPEC;...']
Prints one table: recipes down; retrieval cells as correct/trials (dense with its 95% Wilson interval, * outside
it), NLL as the change against dense, fidelity as the NLL change and the token agreement; attended at the longest
length; the recall diagnostic (mean share of dense attention mass held by fast steps, nll task, longest length).
With --against: the same retrieval cells on two devices, trial by trial (the second file's first n trials, n the
first file's trial count; the eval seeds every trial by its index, so trial i is the same prompt in both).
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


def agreement(mine: list[dict], theirs: list[dict], names: dict[str, str]) -> str:
    """Per retrieval cell of `mine`: correct here, correct in `theirs` over the same trials, same-trial verdicts.
    A recipe spec of `theirs` renamed to a label in `names` is matched to `mine`'s recipe of that label."""
    other = {(names.get(r["recipe"], r["recipe"]), r["task"], r["length"]): r for r in theirs}
    out = ["| recipe | task | length | trials | here | there | same verdict |", "|" + " --- |" * 7]
    for r in mine:
        o = other.get((r["recipe"], r["task"], r["length"]))
        if r["task"] not in RETRIEVAL or o is None:
            continue
        n = len(r["values"])
        there = o["values"][:n]
        same = sum(a == b for a, b in zip(r["values"], there, strict=True))
        out.append(f"| {r['recipe']} | {r['task']} | {r['length'] // 1024}k | {n} | {r['correct']} | "
                   f"{sum(there):.0f} | {same}/{n} |")
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
        print(agreement(rows, load([a.against]), names))
        return
    recipes = a.recipes.split(";") if a.recipes else list(dict.fromkeys(r["recipe"] for r in rows))
    print(table(rows, recipes, [int(n) for n in a.lengths.split(",")], names))


if __name__ == "__main__":
    main()
