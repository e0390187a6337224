"""The docs' links into the code stay true: every relative link names an existing file, every line
anchor lies inside it, an anchor on a code name (`name` or `module.name(...)`) points at lines
that contain that name, and one on a plain [Name] the file defines starts at it or lies inside its
body. Code moves; this catches the links it leaves behind."""

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
            continue
        # a plain [Name] or [Class.method] of something the file defines: starting there, or inside its body
        plain = re.fullmatch(r"([A-Za-z_][\w.]*)(?:\(\))?", text.strip())
        if plain and f.suffix == ".py":
            name = plain.group(1).split(".")[-1]
            blocks = _definitions(lines, name)
            on_lines = re.search(rf"\b{re.escape(name)}\b", "\n".join(lines[a - 1 : min(b, a + 2)]))  # it starts there
            if blocks and not on_lines and not any(start - 3 <= a and b <= end for start, end in blocks):
                problems.append(f"[{text}]({target}): not at or inside {name!r} (defined at line "
                                f"{', '.join(str(s) for s, _ in blocks)})")
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def _definitions(lines: list[str], name: str) -> list[tuple[int, int]]:
    """(first, last) line of each def / class / assignment of ``name`` (1-based; a body ends at the next
    line indented no deeper than the definition that does not close its signature)."""
    n = re.escape(name)
    found = re.compile(rf"^(\s*)(?:async\s+def|def|class)\s+{n}\b|^(\s*)(?:self\.)?{n}\s*(?::[^=]*)?=(?!=)")
    out = []
    for i, line in enumerate(lines):
        m = found.match(line)
        if not m:
            continue
        indent = len(m.group(1) if m.group(1) is not None else m.group(2))
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
                                  or lines[j].lstrip()[:1] in ")]}"):
            j += 1
        out.append((i + 1, j))
    return out
