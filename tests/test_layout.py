"""The package's shape (docs/DESIGN.md section 2): no import circle, the layers import downwards
only, scripts use public modules, the library never imports the demo applications."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "consolidator_hf"


def _modules(package: str) -> Dict[str, str]:
    mods = {}
    for root, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = path
    return mods


def _imported(path: str, module: str) -> Set[str]:
    """Absolute names of everything ``module`` (at ``path``) imports, relative imports resolved."""
    is_pkg = path.endswith("__init__.py")
    base = module if is_pkg else module.rsplit(".", 1)[0]
    names: Set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - node.level + 1]
                stem = ".".join(parts + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _graph(package: str) -> Dict[str, Set[str]]:
    mods = _modules(package)
    graph = {}
    for m, path in mods.items():
        graph[m] = {t for t in _imported(path, m) if t in mods and t != m}
    return graph


def _cycles(graph: Dict[str, Set[str]], skip_packages: bool) -> List[List[str]]:
    # A package's __init__ re-exports its submodules, and submodules import siblings through
    # the package: those edges are not layering, so __init__ modules are left out of the walk.
    mods = _modules(PKG)
    keep = {m for m in graph if not (skip_packages and mods.get(m, "").endswith("__init__.py"))}
    found, state = [], {}

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m] & keep):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(keep):
        if m not in state:
            visit(m, [])
    return found


def test_no_import_circle_inside_the_package():
    cycles = _cycles(_graph(PKG), skip_packages=True)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walker_finds_a_circle(tmp_path):
    # The check above must be able to fail: a two-module circle is reported.
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph, skip_packages=False) == [["a", "b", "a"]]


def test_the_library_never_imports_the_demo_applications():
    offenders = {m: sorted(t for t in _imported(p, m) if t.startswith("consolidator_apps"))
                 for m, p in _modules(PKG).items()}
    assert not {m: t for m, t in offenders.items() if t}


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "scripts"))
                                          if f.endswith(".py")))
def test_scripts_import_only_public_modules(script):
    path = os.path.join(ROOT, "scripts", script)
    names = _imported(path, "scripts." + script[:-3])
    bad = sorted(n for n in names
                 if n.startswith(("consolidator_hf", "consolidator_apps")) and _private(n))
    assert not bad, f"scripts/{script} imports private names: {bad}"


def test_core_modules_know_no_architecture():
    # Architecture knowledge lives in targets.py: the core names no ViT-family module.
    words = ("q_proj", "o_proj", "fc1", "fc2", "intermediate", "classifier", "ViT", "Dinov2")
    for name in ("grouped", "layer", "model", "fast_path", "union_patch", "compiled_path",
                 "input_rebuild"):
        path = os.path.join(ROOT, PKG, name + ".py")
        if not os.path.exists(path):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        code_strings = [n.value for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and isinstance(n.value, str)
                        and not _is_docstring(tree, n)]
        idents = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
        hits = [w for w in words for s in code_strings + idents if w in s]
        assert not hits, f"{name}.py names architecture-specific modules: {sorted(set(hits))}"


def _is_docstring(tree: ast.AST, node: ast.Constant) -> bool:
    for parent in ast.walk(tree):
        body = getattr(parent, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and body[0].value is node:
            return True
    return False
