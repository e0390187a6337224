"""The declared torch floor holds: everything lmzoo takes from torch exists in that release or is guarded.

pyproject.toml declares ``torch>=2.5``. ``tests/fixtures/torch-floor-names.json`` lists, for every torch
module lmzoo imports from, the names that module has in torch 2.5.1 (written by running this file as a
script under that release: ``python tests/test_torch_floor.py --write``). The source scan below finds
every ``import torch.x``, ``from torch.x import y`` and ``torch.x.y`` / ``F.y`` / ``nn.y`` reference in
src/lmzoo and requires each to be in that list, unless it sits in a ``try`` block that catches
ImportError or AttributeError (the fallback then runs on the floor). The two places that need a newer
torch for a name or an argument carry such a fallback, and the last tests run each fallback.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "fixtures" / "torch-floor-names.json"
FLOOR = "2.5"


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> torch module path for ``import torch.x as y`` / ``from torch import x`` style imports."""
    aliases = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            for a in node.names:
                aliases.setdefault(a.asname or a.name, f"{node.module}.{a.name}")
    return aliases


CATCHES = {"ImportError", "ModuleNotFoundError", "AttributeError", "Exception"}


def guarded_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside the body of a ``try`` whose handlers catch ImportError, AttributeError or
    Exception: a name missing there makes the fallback run instead."""
    out: set[int] = set()
    for t in ast.walk(tree):
        if not isinstance(t, ast.Try):
            continue
        caught = set()
        for h in t.handlers:
            for e in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]) if h.type else []:
                caught.add(getattr(e, "id", getattr(e, "attr", "")))
        if caught & CATCHES:
            out |= {id(n) for stmt in t.body for n in ast.walk(stmt)}
    return out


@functools.cache
def _manifest_modules() -> frozenset[str]:
    return frozenset(json.loads(MANIFEST.read_text())["modules"])


def used_names(path: Path, manifest_modules: frozenset[str] | None = None) -> set[tuple[str, str, int]]:
    """(torch module, name, line) of every unguarded use of a torch name in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    guarded = guarded_nodes(tree)
    aliases = _module_aliases(tree)
    manifest_modules = manifest_modules if manifest_modules is not None else _manifest_modules()
    out = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            out |= {(node.module, a.name, node.lineno) for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {(a.name.rpartition(".")[0], a.name.rpartition(".")[2], node.lineno) for a in node.names
                    if a.name.startswith("torch.")}
        elif isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            chain = []
            cur = node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name) or cur.id not in aliases:
                continue
            module, rest = aliases[cur.id], chain[::-1]
            while rest and f"{module}.{rest[0]}" in manifest_modules:  # torch.distributed.tensor.DTensor
                module, rest = f"{module}.{rest[0]}", rest[1:]
            if rest and module in manifest_modules:
                out.add((module, rest[0], node.lineno))
    return out


def test_the_declared_floor_is_the_one_checked():
    deps = re.search(r"dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    assert re.search(rf'"torch>={re.escape(FLOOR)}"', deps), deps
    assert json.loads(MANIFEST.read_text())["torch"].startswith(FLOOR + ".")


def test_every_torch_name_lmzoo_uses_exists_in_the_floor_release_or_is_guarded():
    manifest = json.loads(MANIFEST.read_text())
    names = {m: set(v) for m, v in manifest["modules"].items()}
    missing, unknown = [], []
    for path in sorted((ROOT / "src" / "lmzoo").rglob("*.py")):
        for module, name, line in used_names(path):
            where = f"{path.relative_to(ROOT)}:{line}: {module}.{name}"
            if module not in names:
                unknown.append(where)
            elif name not in names[module] and f"{module}.{name}" not in names:
                missing.append(where)
    assert not unknown, ("torch modules not in the floor manifest (add them: python tests/test_torch_floor.py "
                         f"--write under torch {FLOOR}): {unknown}")
    assert not missing, f"not in torch {FLOOR}, and not guarded by try/except ImportError: {missing}"


def test_the_scan_sees_a_name_the_floor_lacks(tmp_path):
    """The check is not vacuous: the name FSDP2 got in 2.6 is reported where it is imported unguarded, and
    not where a try/except ImportError holds its fallback."""
    assert "fully_shard" not in json.loads(MANIFEST.read_text())["modules"]["torch.distributed.fsdp"]
    bare, fallback = tmp_path / "bare.py", tmp_path / "fallback.py"
    bare.write_text("from torch.distributed.fsdp import fully_shard\n")
    fallback.write_text("try:\n    from torch.distributed.fsdp import fully_shard\nexcept ImportError:\n    pass\n")
    assert used_names(bare) == {("torch.distributed.fsdp", "fully_shard", 1)}
    assert used_names(fallback) == set()


def test_fsdp_falls_back_to_the_pre_release_path_on_the_floor(monkeypatch):
    """torch 2.5 has FSDP2 only as torch.distributed._composable.fsdp: apply_fsdp shards through it."""
    import importlib

    import torch.distributed.fsdp as public
    from torch.distributed._composable import fsdp as pre_release

    import lmzoo

    parallelize = importlib.import_module("lmzoo.distributed.parallelize")
    for name in ("fully_shard", "MixedPrecisionPolicy"):
        monkeypatch.delattr(public, name, raising=False)
    sharded = []
    monkeypatch.setattr(pre_release, "fully_shard", lambda module, **kw: sharded.append((module, kw)))
    model = lmzoo.build("gpt2-debug")
    ctx = type("Ctx", (), {"mesh": "mesh", "config": type("PC", (), {"mp_param_dtype": None, "mp_reduce_dtype": None,
                                                                       "reshard_after_forward": True})()})()
    assert parallelize.apply_fsdp(model, ctx) is model
    assert [m for m, _ in sharded] == [*model.blocks, model] and all(kw["mesh"] == "mesh" for _, kw in sharded)


def test_muon_reshards_without_src_data_rank_on_the_floor(monkeypatch):
    """torch 2.5's distribute_tensor has no src_data_rank: Muon's DTensor path calls it without one."""
    import torch.distributed.tensor as dt

    from lmzoo.train import muon

    calls = []

    def old_distribute_tensor(tensor, device_mesh=None, placements=None):  # torch 2.5's signature
        calls.append((tensor, device_mesh, placements))
        return tensor

    class FakeDTensor(torch.Tensor):
        device_mesh, placements = "mesh", ("shard",)

        def full_tensor(self):
            return torch.Tensor(self)

    monkeypatch.setattr(dt, "distribute_tensor", old_distribute_tensor)
    monkeypatch.setattr(dt, "DTensor", FakeDTensor)
    u = torch.randn(8, 4).as_subclass(FakeDTensor)
    out = muon._orthogonalize(u, steps=5, dtype=None)
    assert len(calls) == 1 and calls[0][1:] == ("mesh", ("shard",))
    torch.testing.assert_close(torch.Tensor(out), muon.newton_schulz(torch.Tensor(u), 5))


def write_manifest() -> None:
    """Record the names of every torch module lmzoo imports from, as this torch has them."""
    import importlib

    modules: dict[str, list[str]] = {}
    queue = {m for path in (ROOT / "src" / "lmzoo").rglob("*.py") for m, _, _ in _imports(path)} | {"torch"}
    for name in sorted(queue):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        modules[name] = sorted(dir(mod))
        for attr in modules[name]:  # submodules reached by attribute (torch.cuda, torch.nn.functional, ...)
            sub = f"{name}.{attr}"
            if sub not in modules and type(getattr(mod, attr, None)).__name__ == "module" and sub.count(".") < 4:
                try:
                    modules[sub] = sorted(dir(importlib.import_module(sub)))
                except ImportError:
                    pass
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    sources = list((ROOT / "src" / "lmzoo").rglob("*.py"))
    while True:  # a submodule reached by attribute before it is imported (torch._dynamo) is a module too
        used = {(m, n) for path in sources for m, n, _ in used_names(path, frozenset(modules))}
        new = {}
        for m, n in used:
            if n not in modules.get(m, ()) and f"{m}.{n}" not in modules:
                try:
                    new[f"{m}.{n}"] = sorted(dir(importlib.import_module(f"{m}.{n}")))
                except ImportError:
                    pass
        if not new:
            break
        modules.update(new)
    # keep the modules the source reaches into (and those it imports from), not every submodule seen
    used = {m for path in sources for m, _, _ in used_names(path, frozenset(modules)) | _imports(path)}
    modules = {m: v for m, v in modules.items() if m in used}
    MANIFEST.write_text(json.dumps({"torch": torch.__version__, "modules": modules}, indent=0) + "\n")


def _imports(path: Path) -> set[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            out.add((node.module, "", node.lineno))
        elif isinstance(node, ast.Import):
            out |= {(a.name, "", node.lineno) for a in node.names if a.name.startswith("torch")}
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(f"usage: python {Path(__file__).name} --write   (under torch {FLOOR}.x)")
    write_manifest()
    print(f"wrote {MANIFEST} for torch {torch.__version__}")
