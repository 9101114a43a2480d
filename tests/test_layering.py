"""The floors of the house: no module imports from a floor above its own.

    shared/sparkle/   (sparkle.*)               the ground floor: imports nothing of the floors above
    services/         (sparkle.services.*)      model services: may import the ground floor
    orchestrator/     (sparkle.orchestrator.*)  the journey, CLI and tools: may import both below
    benchmarks/, tests/                         may import any floor; benchmarks never import tests

Every module's imports are read from its syntax tree (relative imports resolved, imports inside functions
included), so a lazy import cannot hide an upward arrow. The one allowed indirection is the backend registry
(``sparkle.backends.load_backend``), which loads a service by name with importlib, not an import statement.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"shared/sparkle": "sparkle", "services": "sparkle.services", "orchestrator": "sparkle.orchestrator",
           "benchmarks": "benchmarks", "tests": "tests"}
FORBIDDEN = {
    "sparkle": ("sparkle.orchestrator", "sparkle.services", "tests", "benchmarks"),
    "sparkle.services": ("sparkle.orchestrator", "tests", "benchmarks"),
    "sparkle.orchestrator": ("tests", "benchmarks"),
    "benchmarks": ("tests",),
    "tests": ("benchmarks",),
}


def module_name(path: Path) -> tuple[str, str]:
    """``(floor, dotted module name)`` of a source file."""
    rel = path.relative_to(REPO).as_posix()
    for folder, package in sorted(FOLDERS.items(), key=lambda kv: -len(kv[0])):
        if rel.startswith(folder + "/"):
            parts = rel[len(folder) + 1:].removesuffix(".py").split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return package, ".".join([package, *parts]) if parts else package
    raise ValueError(rel)


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import statement in ``path`` (or in ``source``, as if it were that
    file), relative ones resolved."""
    _, name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]  # `from pkg import module`
    return out


def upward_imports(paths, source: str | None = None) -> list[str]:
    """One line per import statement that reaches a forbidden floor: ``file:line (floor) imports module``.
    ``source``: the text of the one file in ``paths`` (a probe that need not exist)."""
    problems = {}
    for path in paths:
        floor, _ = module_name(path)
        for line, target in imports(path, source):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[floor]):
                problems.setdefault(f"{path.relative_to(REPO)}:{line}", f"({floor}) imports {target}")
    return [f"{where} {what}" for where, what in sorted(problems.items())]


def sources():
    for folder in FOLDERS:
        yield from (REPO / folder).rglob("*.py")


def test_no_module_imports_from_a_floor_above_its_own():
    files = list(sources())
    assert len(files) > 60  # every floor was read
    assert upward_imports(files) == []


@pytest.mark.parametrize("folder, code", [
    ("shared/sparkle", "from sparkle.orchestrator.pipeline import summary"),
    ("shared/sparkle", "def f():\n    from .services.grounding import app\n"),
    ("shared/sparkle/algorithms", "from ..orchestrator import jobs"),
    ("services/grounding", "import sparkle.orchestrator.jobs"),
    ("benchmarks", "from tests.conftest import JUGGLE"),
])
def test_the_checker_finds_an_upward_import(folder, code):
    probe = REPO / folder / "_layering_probe.py"  # read from `code`, never written
    assert len(upward_imports([probe], code)) == 1
    assert upward_imports([probe], "import numpy\nfrom sparkle import layout\n") == []
