"""The import graph points one way: each layer of ``LAYERS`` imports only from itself and the layers
below it (docs/architecture.md, "Layers"). Every import counts, at the top of a module, inside a
function (lazy) or under ``TYPE_CHECKING``; an import that must point up is listed in ``EXCEPTIONS``
with its reason, and a listed exception that no longer happens fails too, so the list stays true.

The graph is read with ``ast`` from the source tree (nothing is imported), per module: most layers
are whole packages, and ``dataport/`` (the foundation below everything, the CLI above everything)
and ``api/`` (the HTTP pieces below the GraphQL schema, the app that serves it above) are split by
module."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A module belongs to the layer of its longest matching prefix (a package or a
# module), so "api.app" is the app while every other module of api/ is the HTTP layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Settings, error codes, logging, process helpers, and what a column and a row are.
    ("foundation", tuple(f"dataport.{m}" for m in ("settings", "errors", "logs", "net", "processes", "columns"))),
    ("storage", ("storage",)),
    ("formats", ("formats",)),
    # The data stores, the dataset registry, and the source -> format pipeline.
    ("sources", ("sources",)),
    ("audit", ("audit",)),
    # The domain: the task store and state machine, the export and import services, the shared
    # connections (tasks.services).
    ("tasks", ("tasks",)),
    ("workers", ("workers",)),
    # The HTTP pieces: auth, request context, limits, GraphQL extensions, routes.
    ("api", ("api",)),
    # The GraphQL layer: types and the thin resolvers, one layer (as Saleor's graphql/csv/).
    ("graphql", ("schema", "resolvers")),
    # The ASGI app that puts the routes and the schema together, and the server that runs it.
    ("app", ("api.app", "api.serve")),
    # The composition root: the CLI and the dev server, the audit CLI.
    ("root", ("dataport", "audit.cli")),
]

# (importer, imported): why it points up. Keep it short; every entry must still be in the code.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def packages() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources() -> dict[str, str]:
    """Every module of the service, by dotted name."""
    return {module_name(f): f.read_text() for pkg in packages() for f in sorted((ROOT / pkg).rglob("*.py"))}


# Each source is parsed once per run (the probe reads the tree again).
parse = functools.cache(ast.parse)


def layer_of(module: str) -> int:
    best, found = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def imports(module: str, text: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """The project modules ``module`` imports, with the line: ``from a.b import c`` is ``a.b.c``
    when that is a module, else ``a.b``; relative imports are resolved."""
    is_package = any(m.startswith(module + ".") for m in known)
    for node in ast.walk(parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                yield (full if full in known else base), node.lineno


def edges(sources: Mapping[str, str]) -> Iterator[tuple[str, str, int]]:
    known = set(sources)
    tops = {m.split(".")[0] for m in known}
    for module, text in sources.items():
        for target, line in imports(module, text, known):
            if target.split(".")[0] in tops:
                yield module, target, line


def upward(sources: Mapping[str, str]) -> tuple[list[str], set[tuple[str, str]]]:
    """The imports that point up and are not excepted; and the exceptions that were used."""
    found, used = [], set()
    for module, target, line in edges(sources):
        if layer_of(target) <= layer_of(module):
            continue
        if (module, target) in EXCEPTIONS:
            used.add((module, target))
            continue
        found.append(
            f"{module} (line {line}, layer {LAYERS[layer_of(module)][0]}) imports {target}"
            f" (layer {LAYERS[layer_of(target)][0]}, above it)"
        )
    return found, used


def test_every_package_of_the_service_is_in_a_layer():
    named = {prefix.split(".")[0] for _, prefixes in LAYERS for prefix in prefixes}
    assert set(packages()) <= named, "a new top-level package: place it in LAYERS"


def test_every_exception_says_why():
    assert [key for key, reason in EXCEPTIONS.items() if not reason.strip()] == []


def test_imports_point_down_the_layers():
    found, used = upward(read_sources())
    assert found == [], "imports that point up (docs/architecture.md, Layers):\n" + "\n".join(found)
    assert set(EXCEPTIONS) - used == set(), "exceptions that no longer happen: remove them"


def test_the_check_catches_an_upward_import(monkeypatch):
    """A probe: upward imports at the top, lazy in a function, under TYPE_CHECKING and relative are
    all caught; downward and same-layer imports and a listed exception are not."""
    sources = read_sources()
    sources["storage._probe"] = (
        "from typing import TYPE_CHECKING\n"
        "from dataport import settings\n"  # down (foundation): fine
        "from storage import base\n"  # the same layer: fine
        "from tasks.store import TaskStore\n"  # up
        "if TYPE_CHECKING:\n"
        "    from api.context import Info\n"  # up, for types only: still up
        "def f():\n"
        "    import workers.worker\n"  # up, lazy
        "    from .. import sources\n"  # up, relative
    )
    sources["formats._probe"] = "def g():\n    from sources import registry\n"  # up, excepted below
    sources["dataport._probe"] = "from api import app\n"  # the root may import anything
    sources["api._probe"] = "from schema import types\n"  # the HTTP layer under the schema: up
    monkeypatch.setitem(EXCEPTIONS, ("formats._probe", "sources.registry"), "a probe")
    found, used = upward(sources)
    assert found == [
        "storage._probe (line 4, layer storage) imports tasks.store (layer tasks, above it)",
        "storage._probe (line 6, layer storage) imports api.context (layer api, above it)",
        "storage._probe (line 8, layer storage) imports workers.worker (layer workers, above it)",
        "storage._probe (line 9, layer storage) imports sources (layer sources, above it)",
        "api._probe (line 1, layer api) imports schema.types (layer graphql, above it)",
    ]
    assert used == {("formats._probe", "sources.registry")}
    assert layer_of("api.app") > layer_of("schema") > layer_of("api.context") > layer_of("tasks.store")
    assert layer_of("dataport.cli") > layer_of("api.app") and layer_of("dataport.settings") == 0
