"""README snippets are the files the integration tests execute, so they cannot rot."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = sorted((ROOT / "tests").glob("*/snippets/*.py"))


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_readme_shows_the_executed_snippet(snippet):
    code = re.sub(r'^""".*?"""\n\n', "", snippet.read_text(), count=1, flags=re.S).rstrip() + "\n"
    readme = (ROOT / "README.md").read_text()
    assert f"<!-- snippet: {snippet.relative_to(ROOT)}" in readme
    assert f"```python\n{code}```" in readme


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme


def test_readme_per_set_tables_are_the_result_files():
    readme = (ROOT / "README.md").read_text()
    named = re.findall(r"<!-- table: (\S+) -->\n", readme)
    assert len(named) >= 2
    for path in named:
        assert f"<!-- table: {path} -->\n{(ROOT / path).read_text().rstrip()}\n\n</details>" in readme
