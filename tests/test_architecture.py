"""Architecture rules the developer guide states, checked on the package's source (``reidbuild/``) with ``ast``:

- no module imports a private name (``_x``) from another module: neither ``from m import _x`` nor
  ``m._x`` on a module bound by an import, at module level or inside a function;
- no import cycle among reidbuild modules, counting the imports that run when a module is first imported:
  module-level ``import``/``from ... import`` statements, including those inside module-level ``try``/``if``
  blocks, but not those under ``if TYPE_CHECKING:`` (never executed) nor imports inside functions (run on
  first call, after every module is loaded). ``from pkg import name`` counts as an edge to ``pkg.name`` when
  that is a module, else to ``pkg``;
- no function over 80 lines (``def`` line to last line, docstring included, decorators not), except the data
  tables in ``LONG_FUNCTIONS_ALLOWED``;
- none of the leftovers the plugin refactor removed: artifact kinds guessed from ``.engine`` suffixes, the
  private ``_plain`` lock helper, a hand-written ``BACKENDS`` list.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "reidbuild"
MAX_FUNCTION_LINES = 80

# "module:qualified.function" -> why it may be longer (data tables only); keep short and explain each
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {
    "reidbuild.caffe.schema:_fields_common": "caffe.proto's message fields, one tuple per line (a data table)",
}

FORBIDDEN = re.compile(r'endswith\("\.engine"\)|_plain|BACKENDS\b')


@dataclass(frozen=True)
class Source:
    name: str  # dotted module name
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _sources() -> dict[str, Source]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        out[name] = Source(name, path, ast.parse(path.read_text(), str(path)))
    return out


SOURCES = _sources()


def _resolve(src: Source, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = src.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_targets(src: Source, node: ast.stmt) -> list[str]:
    """The reidbuild modules an import statement loads (see the module docstring for ``from pkg import name``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in SOURCES]
    if isinstance(node, ast.ImportFrom):
        mod = _resolve(src, node)
        out = []
        for a in node.names:
            sub = f"{mod}.{a.name}"
            out.append(sub if sub in SOURCES else mod)
        return [m for m in out if m in SOURCES]
    return []


def _private_uses(src: Source, modules: set[str]) -> list[str]:
    """``from m import _x`` (m another reidbuild module) and ``alias._x`` on a name bound to one of ``modules``."""
    where = src.path.relative_to(REPO) if src.path.is_relative_to(REPO) else src.path
    offenders = []
    module_aliases: set[str] = set()  # local names bound to reidbuild modules anywhere in the file
    for node in ast.walk(src.tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(src, node)
            for a in node.names:
                if f"{mod}.{a.name}" in modules:
                    module_aliases.add(a.asname or a.name)
                elif _is_private(a.name) and mod != src.name and mod.startswith("reidbuild"):
                    offenders.append(f"{where}:{node.lineno}: from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            module_aliases.update(a.asname for a in node.names if a.name in modules and a.asname)
    for node in ast.walk(src.tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            offenders.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
        elif ast.unparse(node.value) in modules and ast.unparse(node.value) != src.name:
            offenders.append(f"{where}:{node.lineno}: {ast.unparse(node.value)}.{node.attr}")  # after `import a.b`
    return offenders


def test_private_name_finder_sees_both_forms():
    """The checker itself, on a made-up module: a private import, a private attribute of an imported module
    (inside a function too), and what is allowed (own names, dunders, attributes of non-modules)."""
    code = """
from .lockfile import _plain, read
from . import lockfile as lf
import reidbuild.pipeline

def f(x):
    from .tensorrt.env import _ok
    return lf._plain(x), reidbuild.pipeline._private, x._fine, lf.__name__, _own()

def _own():
    return 1
"""
    src = Source("reidbuild.fake", Path("/nowhere/reidbuild/fake.py"), ast.parse(code))
    found = _private_uses(src, {"reidbuild.lockfile", "reidbuild.pipeline", "reidbuild.tensorrt.env"})
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "from reidbuild.lockfile import _plain", "from reidbuild.tensorrt.env import _ok", "lf._plain",
        "reidbuild.pipeline._private"]


def test_no_private_names_imported_across_modules():
    offenders = [o for src in SOURCES.values() for o in _private_uses(src, set(SOURCES))]
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


def _runtime_imports(body: list[ast.stmt]) -> list[ast.stmt]:
    """Import statements executed when the module loads (module level, through try/if/with, not TYPE_CHECKING)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                out += _runtime_imports(node.body)
            out += _runtime_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                out += _runtime_imports(block)
        elif isinstance(node, ast.With):
            out += _runtime_imports(node.body)
    return out


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src in SOURCES.values():
        edges = set()
        for node in _runtime_imports(src.tree.body):
            edges.update(m for m in _module_targets(src, node) if m != src.name)
        graph[src.name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a three-module loop is one component, a tail into it is not part of it."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _import_graph()
    assert "reidbuild.cli" in graph and graph["reidbuild.cli"], "the graph must see the CLI's imports"
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail.append(" <-> ".join(comp) + "\n    " + "\n    ".join(
            f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in comp))
    assert not cycles, "module-level import cycles:\n" + "\n".join(detail)


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _long_functions(src: Source) -> dict[str, str]:
    """``module:qualname`` -> where and how long, for each function over MAX_FUNCTION_LINES."""
    out = {}
    for qual, node in _functions(src.tree):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
            where = src.path.relative_to(REPO) if src.path.is_relative_to(REPO) else src.path
            out[f"{src.name}:{qual}"] = f"{where}:{node.lineno} {qual}: {n} lines"
    return out


def test_long_function_finder_measures_methods_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))  # + the def line: exactly the limit
    code = f"def ok():\n{body}\n\nclass C:\n    def long(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n" \
           f"        def inner():\n            pass\n"
    found = _long_functions(Source("reidbuild.fake", Path("fake.py"), ast.parse(code)))
    assert list(found) == ["reidbuild.fake:C.long"] and found["reidbuild.fake:C.long"].endswith(
        f"{MAX_FUNCTION_LINES + 2} lines")


def test_no_long_functions():
    long: dict[str, str] = {}
    for src in SOURCES.values():
        long.update(_long_functions(src))
    stale = sorted(set(LONG_FUNCTIONS_ALLOWED) - set(long))
    assert not stale, f"allowed long functions that are gone or short now (drop them from the list): {stale}"
    offenders = [v for name, v in sorted(long.items()) if name not in LONG_FUNCTIONS_ALLOWED]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_suffix_guessing_private_lock_helpers_or_backend_lists():
    hits = []
    for src in SOURCES.values():
        for i, line in enumerate(src.path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{src.path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
