"""`sfi eval` in a small configuration: task generation, recipe comparison, the CLI."""

from __future__ import annotations

import json
import sys

import pytest

from sfi.errors import ConfigError
from sfi.loader import load_model
from sfi.tools.eval import (
    NLL_TOKENS,
    PREAMBLE,
    TASKS,
    build_trial,
    compare_to_dense,
    evaluate,
    parse_lengths,
    parse_recipe_spec,
    wilson,
)
from sfi_cli.main import main

import tiny


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny.make_checkpoint(tmp_path_factory.mktemp("ev"), "qwen3", num_key_value_heads=4)),
                      device="cpu")


@pytest.mark.parametrize("task", TASKS)
def test_trials_are_seeded_sized_and_hold_their_needles(lm, task):
    tok = lm.tokenizer
    a, b = build_trial(task, tok, 300, 1), build_trial(task, tok, 300, 1)
    assert a == b
    assert build_trial(task, tok, 300, 2).prompt_ids != a.prompt_ids
    assert 200 <= len(a.prompt_ids) <= 330
    text = tok.decode(a.prompt_ids)
    if task == "nll":
        assert len(a.continuation) == NLL_TOKENS and a.answer is None
    elif task == "fidelity":
        assert a.answer is None and text.rstrip().endswith("assistant") and "summary" in text
    else:
        assert a.answer.isdigit() and a.answer in text
        if task == "vartrack":
            assert text.count("VAR ") >= 4  # three assignments and the answer prefix
            assert len(a.chain) == 3 and all(f"VAR {name} =" in text for name in a.chain)
        if task == "preamble":  # the answer starts after a forced sentence, not in the prompt
            assert text.rstrip().endswith("assistant") and tok.decode(a.forced).startswith(PREAMBLE)
            assert a.answer not in tok.decode(a.forced)
        else:
            assert text.rstrip().endswith(("number", "is", "VAR")) and not a.forced  # the answer prefix ends it


def test_scoring():
    from sfi.tools.eval import Trial

    key = Trial("passkey", 10, [1], answer="12345")
    assert key.score(" 12345.") and not key.score(" 1234.")
    var = Trial("vartrack", 10, [1], answer="12345", chain=("X100", "X200", "X300"))
    assert var.score(" X200, VAR X100") and not var.score(" X999, VAR X100") and not var.score(" none")


def test_recipe_specs_with_overrides():
    cfg = parse_recipe_spec("tiny:sfi.k_head=12,sfi.use_nms=false")
    assert cfg.recipe == "tiny:sfi.k_head=12,sfi.use_nms=false"
    assert cfg.sfi.k_head == 12 and not cfg.sfi.use_nms and cfg.sfi.recent == 32
    with pytest.raises(ConfigError):
        parse_recipe_spec("tiny:sfi.nope=1")


def test_parse_lengths():
    assert parse_lengths("2k,4k, 7k") == [2048, 4096, 7168]
    assert parse_lengths("300") == [300]
    with pytest.raises(ConfigError):
        parse_lengths("2q")


def test_wilson_interval():
    assert wilson(0, 10)[0] == 0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson(17, 20)
    assert lo < 17 / 20 < hi


def test_compare_to_dense_pairs_the_trials():
    rows = [{"recipe": "dense", "task": "nll", "length": 9, "nll": 2.0, "values": [1.0, 2.0, 3.0]},
            {"recipe": "x", "task": "nll", "length": 9, "nll": 2.2, "values": [1.1, 2.2, 3.3]},
            {"recipe": "dense", "task": "passkey", "length": 9, "accuracy": 0.5, "ci95": [0.3, 0.7], "values": [1, 0]},
            {"recipe": "x", "task": "passkey", "length": 9, "accuracy": 0.0, "ci95": [0.0, 0.6], "values": [0, 0]}]
    compare_to_dense(rows)
    assert rows[1]["nll_vs_dense"] == pytest.approx(0.1) and rows[1]["nll_vs_dense_ci"] > 0
    assert rows[3]["within_dense_ci"] is False and "nll_vs_dense" not in rows[0]


def test_covering_budget_matches_dense_and_small_budget_reads_less(lm):
    recipes = ["dense", "tiny:sfi.dense_within_budget=false,sfi.k_head=5000", "tiny:sfi.k_head=16,sfi.recent=16"]
    cells = {(c.recipe, c.task): c.summary() for c in evaluate(lm, recipes, ["passkey", "preamble", "nll"], [300],
                                                                  trials=3, batch=2)}
    assert len(cells) == 9 and all(c["trials"] == 3 for c in cells.values())
    dense_nll, cover_nll = cells[("dense", "nll")]["nll"], cells[(recipes[1], "nll")]["nll"]
    assert cover_nll == pytest.approx(dense_nll, abs=1e-4)
    assert cells[(recipes[1], "nll")]["attended_fraction"] == 1.0
    assert cells[("dense", "nll")]["slow_fraction"] == 1.0
    small = cells[(recipes[2], "nll")]
    assert small["attended_fraction"] < 0.3 and small["slow_fraction"] < 0.5
    assert small["nll"] != dense_nll
    for task in ("passkey", "preamble"):
        assert cells[("dense", task)]["values"] == cells[(recipes[1], task)]["values"]
    # the recall diagnostic: fast steps over a covering memory hold all the dense attention mass, a small one less
    cover = cells[(recipes[1], "nll")]
    assert cover["recall"] == pytest.approx(1.0, abs=1e-4) and len(cover["recall_by_layer"]) == lm.args.n_layers
    assert len(cover["recall_by_head"][0]) == lm.args.n_kv_heads
    assert 0 < small["recall"] < 0.99 and all(0 < r <= 1 for r in small["recall_by_layer"])
    assert "recall" not in cells[("dense", "nll")]  # no fast steps


def test_fidelity_against_dense(lm, monkeypatch):
    import sfi.tools.eval

    monkeypatch.setattr(sfi.tools.eval, "FIDELITY_TOKENS", 64)  # the mechanism, not the 256-token length
    recipes = ["dense", "tiny:sfi.dense_within_budget=false,sfi.k_head=5000", "tiny:sfi.k_head=16,sfi.recent=16"]
    cells = {c.recipe: c.summary() for c in evaluate(lm, recipes, ["fidelity"], [200], trials=2, batch=2)}
    assert cells["dense"]["agreement"] == 1.0 and cells["dense"]["top1"] == 1.0
    assert cells[recipes[1]]["agreement"] == 1.0 and cells[recipes[1]]["nll"] == pytest.approx(cells["dense"]["nll"],
                                                                                                abs=1e-4)
    small = cells[recipes[2]]  # the random model's argmax barely moves, its probabilities do
    assert small["attended_fraction"] < 0.5 and small["nll"] > cells["dense"]["nll"] + 1e-3


def test_eval_command_writes_json_and_a_table(lm, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "-m", str(lm.path), "-r", "dense", "-r", "tiny", "--tasks", "passkey,nll",
                 "--lengths", "250", "--trials", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(c["recipe"], c["task"]) for c in data["cells"]} == {(r, t) for r in ("dense", "tiny")
                                                                 for t in ("passkey", "nll")}
    assert "sfi eval" in capsys.readouterr().err
    # The prose comes from this Python's pydoc_data: the JSON says which, so runs elsewhere can be matched.
    assert data["corpus"].startswith(f"pydoc_data.topics of Python {sys.version.split()[0]}, sha256 ")
    assert main(["eval", "-m", str(lm.path), "--tasks", "sudoku"]) == 1
