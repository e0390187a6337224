"""The package's layout keeps its promises: no import cycles, the library never imports tests,
benchmarks or scripts, few loose top-level modules, and no process tags in source or docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (SRC / "lmzoo").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    """lmzoo modules ``f`` imports anywhere (module level or inside functions). ``from pkg import x``
    counts ``pkg.x`` when that is a module, else ``pkg``; relative imports are resolved."""
    is_pkg = f.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import lmzoo.x.y` of an attribute: its module
                t = t.rpartition(".")[0]
            if t.startswith("lmzoo") and t != name:
                out.add(t)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_package_has_no_import_cycle():
    mods = _modules()
    # a package's __init__ is not an edge of its own submodules (Python imports it first, and the
    # packages here keep their __init__ free of imports that would come back)
    graph = {n: {t for t in _imports(n, f, mods) if not n.startswith(t + ".")} for n, f in mods.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_tests_benchmarks_or_scripts():
    bad = []
    for f in (SRC / "lmzoo").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{f.name}: {n}" for n in names if n.split(".")[0] in ("tests", "benchmarks", "scripts")]
    assert bad == []


def test_few_modules_sit_loose_at_the_top_of_the_package():
    loose = sorted(f.name for f in (SRC / "lmzoo").glob("*.py") if f.name not in ("__init__.py", "__main__.py"))
    # the foundations every package uses; everything else lives in a package named for its concept
    assert loose == ["cache.py", "common.py", "config.py", "errors.py", "memguard.py", "tokenizer.py"]


def test_source_and_docs_speak_of_the_code_not_of_issues():
    tag = re.compile(r"\[?\bissues? #?\d+\]?", re.IGNORECASE)
    files = [*(SRC / "lmzoo").rglob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if tag.search(line)]
    assert hits == []
