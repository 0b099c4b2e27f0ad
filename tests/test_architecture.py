"""ARCHITECTURE.md kept true: engine's families import one way (down the layers), and no
function in engine/ or tui/ grows past what a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Bottom to top. A module may import its own family and the families below it, never above.
LAYERS = ["errors", "store", "backends", "run", "llm", "eval", "stages", "pipeline", "top"]
TOP = ("cli", "serve", "crossval")  # entry points: the command line, the server, crossval
MAX_FUNCTION_LINES = 150


def _family(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "engine" or len(parts) < 2:
        return None
    name = parts[1]
    if name in LAYERS:
        return name
    return "top" if name in TOP else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "engine":
                out += [(node.lineno, f"engine.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_every_engine_module_belongs_to_a_family():
    homeless = [
        str(p.relative_to(REPO))
        for p in (REPO / "engine").rglob("*.py")
        if p.name != "__init__.py" or p.parent != REPO / "engine"
        if _family(".".join(p.relative_to(REPO).with_suffix("").parts)) is None
    ]
    assert homeless == [], f"add them to a family (ARCHITECTURE.md): {homeless}"


def test_imports_flow_down_the_layers():
    upward = []
    for p in (REPO / "engine").rglob("*.py"):
        mine = _family(".".join(p.relative_to(REPO).with_suffix("").parts))
        if mine is None:
            continue
        for line, module in _imports(p):
            theirs = _family(module)
            if theirs is None:
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{p.relative_to(REPO)}:{line} ({mine}) imports {module} ({theirs})")
    assert upward == [], "\n".join(upward)


def test_no_function_longer_than_a_reader_can_hold():
    long = []
    for folder in ("engine", "tui"):
        for p in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{p.relative_to(REPO)}: {node.name} is {n} lines")
    assert long == [], "\n".join(long)
