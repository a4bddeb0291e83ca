"""The documentation lives in the repository: every Markdown link of README.md and docs/
resolves to a file of the repository (and a #section to one of its headings), nothing points
outside it, and docs/methods.md describes every precision and guided-training key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from distq.config import DistqConfig
from distq.config.loader import valid_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def anchors(path: Path) -> set[str]:
    """GitHub's ids of a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_docs_exist():
    assert (REPO / "docs" / "methods.md").is_file()
    assert any(target.startswith("docs/methods.md") for target in links(REPO / "README.md"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(doc):
    for target in links(doc):
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"{doc.name}: {target} leaves the repository"
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.is_file(), f"{doc.name}: {target} is not a file"
        assert file.is_relative_to(REPO), f"{doc.name}: {target} is outside the repository"
        if anchor:
            assert anchor in anchors(file), f"{doc.name}: {target}: no heading #{anchor} in {file.name}"


def test_no_reference_to_files_outside_the_repository():
    """Neither the shared methods notes beside the checkout nor their numbered seed papers."""
    pattern = re.compile(r"\.\./shared|seeds? 00\d")
    places = [REPO / "README.md", *(REPO / "docs").rglob("*"), *(REPO / "distq").rglob("*.py"), *(REPO / "configs").rglob("*")]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in places if p.is_file() for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_methods_reference_names_every_policy_and_guided_key():
    text = (REPO / "docs" / "methods.md").read_text()
    keys = [k for k in valid_keys(DistqConfig) if k.startswith(("precision.", "guided.")) and k.count(".") >= 1]
    leaves = [k for k in keys if not any(other.startswith(k + ".") for other in keys)]
    missing = [k for k in leaves if f"`{k}`" not in text and k.rsplit(".", 1)[0] + "." not in text]
    assert missing == []
    for arxiv in ("1606.06160", "1711.00205", "1908.04680", "1905.11781", "2206.12794", "2003.04296", "1902.08153", "1805.06085"):
        assert f"arXiv:{arxiv}" in text


def test_every_row_of_the_refusals_table_names_a_test_that_exists():
    """docs/refusals.md ("What distq refuses, and what it survives", linked from the README): one
    row per mistake, each naming its tests (``FILE.py::test_name`` in tests/mistakes/), and every
    test named exists."""
    section = (REPO / "docs" / "refusals.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| mistake") and "---" not in line]
    assert len(rows) >= 20
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert named, f"row without a test: {row}"
        for file, name in named:
            source = (REPO / "tests" / "mistakes" / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} named in README.md does not exist"


def _mkdocs_build(root: Path, tmp_path: Path):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_user_guide_builds_strictly(tmp_path):
    """``make docs``: every page in the nav, no broken link or anchor (a strict build fails on either)."""
    proc = _mkdocs_build(REPO, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_broken_link_fails_the_strict_build(tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / "docs", copy / "docs")
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    with open(copy / "docs" / "index.md", "a") as f:
        f.write("\n[nowhere](no-such-page.md)\n")
    proc = _mkdocs_build(copy, tmp_path)
    assert proc.returncode != 0 and "no-such-page.md" in proc.stderr
