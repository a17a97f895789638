"""MkDocs hooks for the documentation site (mkdocs.yml names this file under `hooks:`)."""

from __future__ import annotations

import re
from typing import Any

_CODE = re.compile(r"<code>(.*?)</code>", re.DOTALL)


def on_page_content(html: str, **_: Any) -> str:
    r"""A `|` inside code in a table cell is written `\|` so that GitHub keeps the cell whole; Python-Markdown
    splits the cells on the escaped form just as well but leaves the backslash in the code: drop it there."""
    return _CODE.sub(lambda m: "<code>" + m.group(1).replace("\\|", "|") + "</code>", html)
