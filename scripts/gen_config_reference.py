"""Regenerate the config reference in README.md from the schema (tests/test_readme.py checks it)."""

from __future__ import annotations

from pathlib import Path

from dolphin_train.config.reference import BEGIN, END, render_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{render_reference()}\n{END}{tail}")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
