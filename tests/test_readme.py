"""The README's config reference is generated from the schema and must not drift from it."""

from __future__ import annotations

from conftest import REPO
from dolphin_train.config.reference import BEGIN, END, render_reference


def test_readme_config_reference_matches_schema() -> None:
    readme = (REPO / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README lacks the generated config reference markers"
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert current.strip() == render_reference().strip(), "run: python scripts/gen_config_reference.py"
