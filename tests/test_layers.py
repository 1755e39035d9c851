"""The package's layers import one way only (docs/architecture.md), and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvcli"

# module (dotted, under kvcli) prefix -> layer; the longest matching prefix wins
LAYERS = {
    "cli": "face",
    "eval": "eval",
    "batch": "batch",
    "reading": "reading",
    "profile": "reading",
    "generate": "engine",
    "cache": "engine",
    "attention": "engine",
    "step": "engine",
    "repeat": "engine",
    "rope": "engine",
    "reindex": "engine",
    "skim": "engine",
    "flash": "engine",
    "decode_kernel": "engine",
    "threads": "engine",
    "methods": "methods",
    "ingest": "text",
    "prompt": "text",
    "sources": "text",
    "attribution": "engine",
    "models": "models",
    "stats": "reports",
    "inspect": "reports",
    "plot": "reports",
    "store": "store",
    "atomic": "base",
    "heap": "base",
    "speed": "store",
    "errors": "base",
    "native": "base",
    "defaults": "base",
    "__init__": "base",
    "__main__": "face",
}

# layer -> the layers it may import (itself and `base` always)
ALLOWED = {
    "face": {"eval", "batch", "reading", "engine", "methods", "text", "models", "reports", "store"},
    "eval": {"reading", "engine", "methods", "text", "reports", "store"},
    "batch": {"reading", "methods", "text", "models", "store"},
    "reading": {"engine", "methods", "text", "reports", "models", "store"},
    "engine": {"methods"},
    "methods": {"engine"},  # only the attention helpers: checked below
    "text": set(),
    "models": set(),
    "reports": {"engine"},
    "store": {"engine"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> str:
    head = module.split(".")[0]
    return LAYERS[head]


def imports(path: Path) -> set[str]:
    """kvcli modules imported anywhere in `path` (functions included), as dotted names under kvcli."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("kvcli"):
                target = node.module.removeprefix("kvcli").lstrip(".")
            else:
                continue
            if node.module is None:  # `from . import attention`: the names are modules
                found.update(".".join(filter(None, [target, alias.name])) for alias in node.names)
            else:
                found.add(target or "__init__")
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("kvcli.") for alias in node.names if alias.name.startswith("kvcli."))
    found.discard(name)
    return {f for f in found if f}


def graph() -> dict[str, set[str]]:
    """Each module's kvcli imports, resolved to modules (`from .. import __version__` is the package's `__init__`)."""
    raw = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}

    def resolve(target: str) -> str:
        while target and target not in raw:
            target = target.rpartition(".")[0]
        return target or "__init__"

    return {module: {resolve(t) for t in targets} - {module} for module, targets in raw.items()}


def test_every_module_has_a_layer():
    """Each module of the package belongs to one of the documented layers."""
    for module in graph():
        assert layer_of(module) in ALLOWED or layer_of(module) == "base", module


def test_imports_point_down_the_layers():
    """No module imports a layer above its own (the table in docs/architecture.md); methods use only the engine's attention helpers."""
    wrong = []
    for module, targets in graph().items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if theirs in (mine, "base"):
                continue
            if mine == "base" or theirs not in ALLOWED[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
            elif mine == "methods" and target not in ("attention",):
                wrong.append(f"{module} (methods) imports {target}: methods may use only the attention helpers")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    """Following imports (top-level and inside functions) from any module never leads back to it."""
    # a package's __init__ re-exports its modules; a module naming its own package is not a cycle
    resolved = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in resolved[module]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in resolved:
        if module not in state:
            visit(module)
