"""Safe YAML reading that remembers where every value came from.

Manifests and patch files are user input: this reader refuses what a plain ``yaml.safe_load`` would
quietly accept (duplicate keys, alias bombs, huge or non-UTF-8 files) and keeps a line/column for every
path so validation errors can point at ``file:line:column``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

MAX_BYTES = 1 << 20  # 1 MiB: manifests and patches are small; anything bigger is a mistake or an attack
MAX_NODES = 100_000  # bound on the expanded document, which stops alias ("billion laughs") bombs
MAX_DEPTH = 100  # nesting bound; PyYAML's composer recurses, so deeper input is refused before composing

Loc = tuple[int, int]  # 1-based line, column
PathKey = tuple[Any, ...]


@dataclass
class Document:
    """A parsed YAML document plus the source position of every value, keyed by its path."""

    path: Path
    data: Any
    positions: dict[PathKey, Loc] = field(default_factory=dict)

    def where(self, key_path: PathKey) -> str:
        """``file:line:column`` of the deepest known ancestor of ``key_path``."""
        p = tuple(key_path)
        while p not in self.positions and p:
            p = p[:-1]
        line, col = self.positions.get(p, (1, 1))
        return f"{self.path}:{line}:{col}"


class _Builder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.positions: dict[PathKey, Loc] = {}
        self.depth = 0
        self.constructor = yaml.SafeLoader("")  # one constructor for every scalar (making one is not free)

    def _fail(self, node: yaml.Node, what: str) -> InputError:
        m = node.start_mark
        return InputError(f"{self.path}:{m.line + 1}:{m.column + 1}: {what}")

    def build(self, node: yaml.Node, at: PathKey) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self._fail(node, f"document expands to more than {MAX_NODES} values (alias bomb?)")
        if self.depth > MAX_DEPTH:
            raise self._fail(node, f"nesting deeper than {MAX_DEPTH} levels")
        self.positions.setdefault(at, (node.start_mark.line + 1, node.start_mark.column + 1))
        self.depth += 1
        try:
            if isinstance(node, yaml.MappingNode):
                out: dict[Any, Any] = {}
                for knode, vnode in node.value:
                    if knode.tag == "tag:yaml.org,2002:merge":
                        raise self._fail(knode, "YAML merge keys ('<<') are not supported; write the keys out")
                    key = self._scalar(knode)
                    if isinstance(key, (list, dict)):
                        raise self._fail(knode, "mapping keys must be plain scalars")
                    if key in out:
                        raise self._fail(knode, f"duplicate key {key!r}")
                    self.positions[at + (key,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                    out[key] = self.build(vnode, at + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [self.build(v, at + (i,)) for i, v in enumerate(node.value)]
            return self._scalar(node)
        finally:
            self.depth -= 1

    def _scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return self.build(node, ())
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self._fail(node, f"cannot read value: {str(exc).splitlines()[0]}") from None


def read_text(path: Path, what: str = "file") -> str:
    """Read a small UTF-8 text file, refusing huge or undecodable ones with a one-line error."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a regular file")
    if size > MAX_BYTES:
        raise InputError(f"{path}: {what} is {size} bytes; at most {MAX_BYTES} are accepted")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: {what} is not valid UTF-8 (byte offset {exc.start})") from None


def load(path: Path, what: str = "file", fast: bool = False) -> Document:
    """Parse one YAML document safely; errors name ``file:line:column``.

    ``fast`` parses with libyaml when PyYAML has it (the lock: machine-written and read on every apply, where
    the pure-Python parser costs tens of ms); hand-written files keep the pure-Python parser's messages.
    """
    text = read_text(path, what)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader) if fast else yaml.SafeLoader
    try:
        _check_depth(text, path, loader)
        node = yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
        raise InputError(f"{path}:{loc}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if node is None:
        return Document(path, None, {(): (1, 1)})
    builder = _Builder(path)
    data = builder.build(node, ())
    return Document(path, data, builder.positions)


def load_mapping(path: Path, what: str, error: type[InputError], keys: str) -> Document:
    """``load`` for a file whose top level must be a mapping (manifests, patch files); every failure is
    raised as ``error`` so callers keep their own error type."""
    try:
        doc = load(path, what)
    except error:
        raise
    except InputError as exc:
        raise error(exc.message) from None
    if not isinstance(doc.data, dict):
        raise error(f"{path}:1:1: a {what} must be a mapping with keys {keys}")
    return doc


def _check_depth(text: str, path: Path, loader: type = yaml.SafeLoader) -> None:
    """Refuse deep nesting and huge documents from the (iterative, streaming) event parser, before the
    recursive, slower composer sees them."""
    depth = values = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise InputError(f"{path}:{_where(event)}: nesting deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            values += 1
            if values > MAX_NODES:
                raise InputError(f"{path}:{_where(event)}: document has more than {MAX_NODES} values")


def _where(event: yaml.Event) -> str:
    """``line:column`` (1-based) where a parser event starts; PyYAML's parser always sets the mark."""
    m = event.start_mark
    return f"{m.line + 1}:{m.column + 1}" if m is not None else "?"
