"""The documentation: the config reference pages are the schema's, the README stays a short front page whose
links resolve, and the shell snippets the docs mark `<!-- runs-on-cpu -->` run as written.

The site itself is built by `mkdocs build --strict` in .ci/run (a broken link, a missing anchor or a page left
out of the nav fails it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dolphin_train.config import reference
from dolphin_train.config.load import load_config

DOCS = REPO / "docs"
README = REPO / "README.md"
README_LIMIT = 12_000  # characters (issue 24): the manual lives in docs/
REGENERATE = "run: python scripts/gen_config_reference.py"


def test_reference_pages_are_generated_from_the_schema() -> None:
    pages = reference.reference_pages()
    folder = DOCS / "reference"
    for name, text in pages.items():
        page = folder / name
        assert page.is_file() and page.read_text() == text, f"{page} differs from the schema; {REGENERATE}"
    generated = [p.name for p in folder.glob("*.md") if p.read_text().startswith(reference.GENERATED)]
    stale = [name for name in generated if name not in pages]
    assert not stale, f"generated pages of sections the schema no longer has: {stale}; {REGENERATE}"
    index = (folder / "index.md").read_text()
    assert reference.between(index, reference.INDEX_BEGIN, reference.INDEX_END) == reference.render_index_list()
    mkdocs = (REPO / "mkdocs.yml").read_text()
    nav = reference.between(mkdocs, reference.NAV_BEGIN, reference.NAV_END)
    assert nav.rstrip() == reference.render_nav(), f"mkdocs.yml's reference nav is stale; {REGENERATE}"


def test_every_schema_section_has_its_page_and_every_key_a_row() -> None:
    pages = reference.reference_pages()
    assert [f"{s}.md" for s in reference.SECTIONS] == list(pages)
    # The pages together hold exactly the tables of the one-text reference (what the README held before).
    rows = [line for page in pages.values() for line in page.splitlines() if line.startswith("| `")]
    assert rows == [line for line in reference.render_reference().splitlines() if line.startswith("| `")]


def test_readme_is_a_short_front_page_with_the_test_command() -> None:
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md: {len(text):,} characters, at most {README_LIMIT:,}: move to docs/"
    # .ci/run runs "the README's test command": the README must keep showing it.
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in text


def test_readme_config_example_is_a_valid_config(tmp_path: Path) -> None:
    """The README's config example passes the same checks as `dolphin-train validate` (its data file is the
    reader's own, so only the config is checked)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "the README shows one config example"
    example = tmp_path / "example.yml"
    example.write_text(blocks[0])
    cfg = load_config(example)
    assert cfg.adapter == "qlora" and cfg.micro_batch_size == "auto"


def _headings(markdown: str) -> list[str]:
    headings, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            headings.append(m.group(1))
    return headings


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve() -> None:
    """The README is read on GitHub: each relative link must name a file of the repository, and an anchor one
    of that file's headings."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = REPO / path if path else README
        anchors = {github_anchor(h) for h in _headings(file.read_text())} if file.is_file() else set()
        if not file.exists() or (anchor and anchor not in anchors):
            broken.append(target)
    assert not broken, f"README links with no target: {broken}"


def test_github_anchor_matches_githubs_rule() -> None:
    assert github_anchor("Sample packing (`scripts/bench_packing.py`)") == "sample-packing-scriptsbench_packingpy"
    assert github_anchor("Data preparation against axolotl 0.19 (`--corpus real`)") == (
        "data-preparation-against-axolotl-019---corpus-real"
    )


# A snippet that runs on a CPU, in a few seconds, is marked by an HTML comment line just before its fence;
# `exit=N` when the snippet shows a failure. Snippets that need a GPU, the network or minutes are not marked.
MARKER = re.compile(r"^<!-- runs-on-cpu(?: exit=(\d+))? -->$", re.MULTILINE)
SNIPPET = re.compile(r"^<!-- runs-on-cpu(?: exit=(\d+))? -->\n```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def cpu_snippets() -> list[pytest.param]:
    params = []
    for doc in _documents():
        text = doc.read_text()
        for m in SNIPPET.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            where = f"{doc.relative_to(REPO)}:{line}"
            params.append(pytest.param(m.group(2), int(m.group(1) or 0), id=where))
    return params


def test_every_marker_marks_a_bash_block() -> None:
    for doc in _documents():
        text = doc.read_text()
        assert len(MARKER.findall(text)) == len(SNIPPET.findall(text)), (
            f"{doc}: a `<!-- runs-on-cpu -->` marker must be directly followed by a ```bash block"
        )
    assert cpu_snippets(), "no snippet of the docs is marked `<!-- runs-on-cpu -->`"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "expected_exit"), cpu_snippets())
def test_cpu_snippet_runs(script: str, expected_exit: int, tmp_path: Path) -> None:
    """Run as a reader would from a checkout (the repository's configs and data, copied so that nothing is
    written into the repository), with this environment's `dolphin-train` first on PATH."""
    for folder in ("configs", "data", "deepspeed_configs"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"), COLUMNS="120")
    strict = "set -euo pipefail\n" if expected_exit == 0 else ""
    result = subprocess.run(
        ["bash", "-c", strict + script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = (result.stdout[-4000:] + "\n" + result.stderr[-4000:]).strip()
    assert result.returncode == expected_exit, f"exit {result.returncode}, expected {expected_exit}:\n{output}"
    if expected_exit == 0:
        assert "Traceback" not in output, output
