"""`.ci/run`: it runs exactly the README's one-line commands, and a dirty tree cannot pass the quick start."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(tmp_path: Path, quickstart: str, tests: str = "true") -> Path:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "jobs.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    (tmp_path / "README.md").write_text(f"# x\n\n<!-- ci:quickstart -->\n```bash\n{quickstart}\n```\n\n"
                                        f"<!-- ci:tests -->\n```bash\n{tests}\n```\n")
    return tmp_path


def _run(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(tree / ".ci" / "run")], capture_output=True, text=True, timeout=60)


def test_one_command_per_block_runs(tmp_path):
    tree = _tree(tmp_path, "printf 'x\\ny\\n' > results.jsonl")
    r = _run(tree)
    assert r.returncode == 0, r.stderr
    assert "ci: [quickstart] printf" in r.stdout and "ci: [tests] true" in r.stdout


def test_a_block_of_two_lines_fails_loudly(tmp_path):
    tree = _tree(tmp_path, "printf 'x\\ny\\n' > results.jsonl\nexit 0")
    r = _run(tree)
    assert r.returncode == 1 and "must hold exactly one command line" in r.stderr


def test_a_leftover_output_cannot_pass_the_quick_start(tmp_path):
    tree = _tree(tmp_path, "true")  # writes nothing
    (tree / "results.jsonl").write_text("x\ny\n")  # what an earlier run left
    r = _run(tree)
    assert r.returncode != 0 and not (tree / "results.jsonl").exists()
