"""The docs have no dead relative links: every relative link in README.md and docs/*.md
points to a file or folder that exists in the repository (anchors are not checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
# [text](target) and [text](target "title"), not images' data URIs; skip code spans/blocks
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"```.*?```", re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


def relative_links(path: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", path.read_text()))
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto:, ... and same-page anchors
        out.append(target)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    dead = []
    for target in relative_links(doc):
        file_part = target.split("#", 1)[0]
        if file_part and not (doc.parent / file_part).exists():
            dead.append(target)
    assert not dead, f"dead links in {doc.relative_to(REPO)}: {dead}"


def test_link_finder() -> None:
    sample = REPO / "docs" / "deploy.md"
    assert "sizing.md" in relative_links(sample)
