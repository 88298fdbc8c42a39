"""The README documents every option: it is regenerated from common/config.py, never drifts."""

from __future__ import annotations

from pathlib import Path

from docs.gen_options import table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_options_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert table() in readme, "README's options table is stale: run python docs/gen_options.py"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()
