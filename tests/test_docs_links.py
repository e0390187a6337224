"""The docs' links into the code stay true as code moves: every relative link names an existing file,
links into source files point at symbols rather than line numbers, and every symbol a link names
(its text, `name` or [Name], or a `name` in brackets right after it) is defined in the linked file."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# [text](target), then optionally " (`symbol`...)": the symbol a prose link stands for
LINK = re.compile(r"\[((?:[^\[\]]|\\\[|\\\])+)\]\(([^)\s]+)\)(?: \(`([A-Za-z_][\w.]*)`)?")
CODE = re.compile(r"`([A-Za-z_][\w.]*)[^`]*`")
PLAIN = re.compile(r"([A-Za-z_][\w.]*)(?:\(\))?")


def _links(page: Path):
    for m in LINK.finditer(page.read_text()):
        text, target, after = m.group(1), m.group(2), m.group(3)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):  # http(s), mailto, in-page
            continue
        yield text.replace("\\_", "_"), target, after


@functools.cache
def _defined(path: Path) -> frozenset[str]:
    """Every name a Python file defines: functions, classes, methods, and assigned names (any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)  # self.x = ...
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return frozenset(names)


def _symbols(text: str) -> list[str]:
    """The code names a link's text states: `a.b(...)` -> b, [Name] -> Name; none for prose."""
    text = text.strip()
    if "/" in text or text.strip("`").endswith((".py", ".md")):  # a file's name, not a symbol
        return []
    code = CODE.fullmatch(text)
    if code:
        return [code.group(1).split(".")[-1]]
    plain = PLAIN.fullmatch(text)
    return [plain.group(1).split(".")[-1]] if plain and "." not in text[:1] else []


def test_the_docs_have_links_to_symbols():
    named = [t for p in PAGES for text, t, after in _links(p) if t.split("#")[0].endswith(".py")
             and (_symbols(text) or after)]
    assert len(named) > 100  # the check below must have something to check


def test_the_symbol_check_catches_a_stale_link(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("class A:\n    def run(self, x):\n        self.cache = x\n")
    assert {"A", "run", "cache", "x"} <= _defined(f) and "gone" not in _defined(f)
    assert _symbols("`A.run(x)`") == ["run"] and _symbols("[A]".strip("[]")) == ["A"] and _symbols("the line") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_name_existing_files_and_symbols_they_define(page):
    problems = []
    for text, target, after in _links(page):
        path, _, frag = target.partition("#")
        f = (page.parent / path).resolve()
        if not f.exists():
            problems.append(f"{target}: no such file")
            continue
        if f.suffix != ".py":
            continue
        if re.fullmatch(r"L\d+(-L\d+)?", frag):
            problems.append(f"[{text}]({target}): a line anchor (links name symbols, which survive moves)")
        for name in [after.split(".")[-1]] if after else _symbols(text):  # a symbol after it: the text is prose
            if name not in _defined(f):
                problems.append(f"[{text}]({target}): {name!r} is not defined in {f.name}")
    assert not problems, f"{page.name}:\n" + "\n".join(problems)
