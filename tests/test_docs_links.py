"""The docs' links into the code stay true: every relative link names an existing file, every line
anchor lies inside it, and an anchor on a code name (`name` or `module.name(...)`) points at lines
that contain that name. Code moves; this catches the links it leaves behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
ANCHOR = re.compile(r"#L(\d+)(?:-L(\d+))?$")


def _links(page: Path):
    for m in LINK.finditer(page.read_text()):
        text, target = m.group(1), m.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):  # http(s), mailto, in-page
            continue
        yield text, target


def test_the_docs_have_links_into_the_code():
    anchored = [t for p in PAGES for _, t in _links(p) if ANCHOR.search(t)]
    assert len(anchored) > 100  # the check below must have something to check


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_line_anchors_are_true(page):
    problems = []
    for text, target in _links(page):
        path, _, frag = target.partition("#")
        f = (page.parent / path).resolve()
        if not f.exists():
            problems.append(f"{target}: no such file")
            continue
        m = ANCHOR.search("#" + frag) if frag else None
        if not m:
            continue
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        lines = f.read_text().splitlines()
        if not 1 <= a <= b <= len(lines):
            problems.append(f"{target}: lines {a}-{b} outside the file's {len(lines)}")
            continue
        # `name`, `module.name(...)`, or `name` (file.py:N) as the generated links write it
        code = re.fullmatch(r"`([A-Za-z_][\w.]*)[^`]*`(?: \([\w./-]+:\d+(?:-\d+)?\))?", text.strip(), re.S)
        if code:
            name = code.group(1).split(".")[-1]
            if not re.search(rf"\b{re.escape(name)}\b", "\n".join(lines[a - 1 : b])):
                problems.append(f"[{text.splitlines()[0]}]({target}): {name!r} is not on those lines")
    assert not problems, f"{page.name}:\n" + "\n".join(problems)
