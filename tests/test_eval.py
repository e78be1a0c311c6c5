"""`sfi eval` in a small configuration: task generation, recipe comparison, the CLI."""

from __future__ import annotations

import json

import pytest

from sfi.errors import ConfigError
from sfi.eval import NLL_TOKENS, TASKS, build_trial, evaluate, parse_lengths, parse_recipe_spec
from sfi.loader import load_model
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
    else:
        assert a.answer.isdigit() and a.answer in text
        if task == "vartrack":
            assert text.count("VAR ") >= 4  # three assignments and the answer prefix
            assert len(a.chain) == 3 and all(f"VAR {name} =" in text for name in a.chain)
        assert text.rstrip().endswith(("number", "is", "VAR"))  # the answer prefix ends the prompt


def test_scoring():
    from sfi.eval import Trial

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


def test_covering_budget_matches_dense_and_small_budget_reads_less(lm):
    recipes = ["dense", "tiny:sfi.dense_within_budget=false,sfi.k_head=5000", "tiny:sfi.k_head=16,sfi.recent=16"]
    cells = {(c.recipe, c.task): c.summary() for c in evaluate(lm, recipes, ["passkey", "nll"], [300], trials=3,
                                                                  batch=2)}
    assert len(cells) == 6 and all(c["trials"] == 3 for c in cells.values())
    dense_nll, cover_nll = cells[("dense", "nll")]["nll"], cells[(recipes[1], "nll")]["nll"]
    assert cover_nll == pytest.approx(dense_nll, abs=1e-4)
    assert cells[(recipes[1], "nll")]["attended_fraction"] == 1.0
    assert cells[("dense", "nll")]["slow_fraction"] == 1.0
    small = cells[(recipes[2], "nll")]
    assert small["attended_fraction"] < 0.3 and small["slow_fraction"] < 0.5
    assert small["nll"] != dense_nll
    assert cells[("dense", "passkey")]["correct"] == cells[(recipes[1], "passkey")]["correct"]


def test_eval_command_writes_json_and_a_table(lm, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "-m", str(lm.path), "-r", "dense", "-r", "tiny", "--tasks", "passkey,nll",
                 "--lengths", "250", "--trials", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(c["recipe"], c["task"]) for c in data["cells"]} == {(r, t) for r in ("dense", "tiny")
                                                                 for t in ("passkey", "nll")}
    assert "sfi eval" in capsys.readouterr().err
    assert main(["eval", "-m", str(lm.path), "--tasks", "sudoku"]) == 1
