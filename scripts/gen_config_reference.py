"""Regenerate the config reference pages from the schema: docs/reference/<section>.md, the list of them on
docs/reference/index.md and their entries in mkdocs.yml's nav (tests/test_docs.py checks all three)."""

from __future__ import annotations

from pathlib import Path

from dolphin_train.config.reference import (
    GENERATED,
    INDEX_BEGIN,
    INDEX_END,
    NAV_BEGIN,
    NAV_END,
    reference_pages,
    render_index_list,
    render_nav,
    replace_between,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT / "docs" / "reference"


def stale_pages(folder: Path, pages: dict[str, str]) -> list[Path]:
    """Generated pages of sections the schema no longer has."""
    return [p for p in sorted(folder.glob("*.md")) if p.name not in pages and p.read_text().startswith(GENERATED)]


def main() -> None:
    pages = reference_pages()
    for name, text in pages.items():
        (REFERENCE_DIR / name).write_text(text)
    for page in stale_pages(REFERENCE_DIR, pages):
        page.unlink()
        print(f"removed {page}")
    index = REFERENCE_DIR / "index.md"
    index.write_text(replace_between(index.read_text(), INDEX_BEGIN, INDEX_END, render_index_list()))
    mkdocs = ROOT / "mkdocs.yml"
    mkdocs.write_text(replace_between(mkdocs.read_text(), NAV_BEGIN, NAV_END, render_nav()))
    print(f"updated {len(pages)} pages in {REFERENCE_DIR}, its index and the nav of {mkdocs}")


if __name__ == "__main__":
    main()
