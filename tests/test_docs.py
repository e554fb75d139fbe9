"""The documentation a newcomer reads stays true: every ```python block of README.md runs as written (in
order, in one namespace, on the packaged Shapes model), the README stays short, its links stay inside
the repository, and its results table and benchmarks/README.md match benchmarks/results/*.json.

Blocks fenced as ```python no-run (FLUX.1 and the Hub: a GPU or the network) and ```bash are not run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
DOCS = (README, ROOT / "benchmarks" / "README.md", ROOT / "docs" / "research-log.md")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in PYTHON_BLOCK.finditer(text)]


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it within {MAX_LINES} (details elsewhere)."


def test_readme_code_runs_as_written(monkeypatch, tmp_path):
    """Each block sees what the blocks before it defined, as a reader typing them in order would."""
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5, "README.md lost its API tour (```python blocks)."
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks, 1):
        code = compile(block, f"README.md, python block {i}", "exec")
        exec(code, namespace)  # a failure names the block and the line inside it


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc):
    """Relative links point at files that exist in the repository (nothing outside it, like ../shared)."""
    bad = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)} links to what is not in the repository: {bad}"


def test_results_are_generated_from_the_results_files():
    """README.md's table and benchmarks/README.md are what benchmarks/report.py renders now."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
