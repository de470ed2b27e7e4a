"""YAML loading that remembers where every value came from, for ``file:line: key: problem`` errors.

PyYAML's composed node tree has the marks; :func:`load_documents` turns it into plain dicts and
lists (subclasses :class:`LMap` and :class:`LList`) that carry the line of each key or item, so
validators can report the exact place of a bad value without a schema library.

Hostile input is refused, never expanded (policy text arrives over the admin API): by default
anchors and aliases are refused outright (``aliases=False``), so a document's expanded size is
its text's size and a "billion laughs" document is one clear error; nesting deeper than
:data:`MAX_DEPTH` and more than :data:`MAX_NODES` values are refused too. Every malformed
input, NUL bytes and other characters YAML forbids included, is a :class:`YamlSyntaxError`
naming the place, never another exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Where:
    """A place in a source file."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class LMap(dict[str, Any]):
    """A mapping that knows its own line and the line of each key."""

    where: Where
    key_lines: dict[str, int]

    def where_of(self, key: str) -> Where:
        return Where(self.where.file, self.key_lines.get(key, self.where.line))


class LList(list[Any]):
    """A sequence that knows its own line and the line of each item."""

    where: Where
    item_lines: list[int]

    def where_of(self, index: int) -> Where:
        if 0 <= index < len(self.item_lines):
            return Where(self.where.file, self.item_lines[index])
        return self.where


#: Deepest nesting of mappings and sequences accepted (a CiliumNetworkPolicy needs about 10).
MAX_DEPTH = 100
#: Most values one text may produce (after alias expansion, where aliases are allowed).
MAX_NODES = 1_000_000


_NO_ALIASES = "write the value out (anchors and aliases are refused in policy text)"


class YamlSyntaxError(Exception):
    """The file is not valid YAML; the message is ``file:line: problem``."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and anchors (unless allowed) and deep nesting while
    composing, before anything is expanded or recursed into."""

    def __init__(self, text: str, file: str, aliases: bool) -> None:
        super().__init__(text)
        self.file = file
        self.aliases = aliases
        self.depth = 0
        self.nodes = 0

    def refuse(self, mark: Any, problem: str) -> YamlSyntaxError:
        return YamlSyntaxError(f"{self.file}:{mark.line + 1 if mark else 0}: invalid YAML: {problem}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if not self.aliases:
            if isinstance(event, yaml.AliasEvent):
                raise self.refuse(event.start_mark, f"alias *{event.anchor} not allowed: {_NO_ALIASES}")
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                raise self.refuse(event.start_mark, f"anchor &{anchor} not allowed: {_NO_ALIASES}")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.refuse(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _convert(node: yaml.Node, file: str, constructor: _Loader) -> Any:
    constructor.nodes += 1
    if constructor.nodes > MAX_NODES:
        raise YamlSyntaxError(
            f"{file}:{node.start_mark.line + 1}: invalid YAML: more than {MAX_NODES} values"
        )
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        m = LMap()
        m.where = Where(file, line)
        m.key_lines = {}
        constructor.flatten_mapping(node)
        for knode, vnode in node.value:
            key = _convert(knode, file, constructor)
            if isinstance(key, (dict, list)):
                raise YamlSyntaxError(f"{file}:{knode.start_mark.line + 1}: a mapping key must be a scalar")
            skey = key if isinstance(key, str) else str(key)
            if skey in m:
                raise YamlSyntaxError(f"{file}:{knode.start_mark.line + 1}: {skey}: duplicate key")
            m[skey] = _convert(vnode, file, constructor)
            m.key_lines[skey] = knode.start_mark.line + 1
        return m
    if isinstance(node, yaml.SequenceNode):
        seq = LList()
        seq.where = Where(file, line)
        seq.item_lines = []
        for item in node.value:
            seq.append(_convert(item, file, constructor))
            seq.item_lines.append(item.start_mark.line + 1)
        return seq
    return constructor.construct_object(node, deep=True)


def load_documents(text: str, file: str, *, aliases: bool = False) -> Iterator[tuple[Any, Where]]:
    """Yield each YAML document of ``text`` (converted) with where it starts.

    Raises :class:`YamlSyntaxError` for malformed YAML, for anchors and aliases unless
    ``aliases`` (see the module docstring), and for input over the depth and size caps.
    Empty documents are skipped.
    """
    loader: _Loader | None = None
    try:
        loader = _Loader(text, file, aliases)  # the reader checks every character here
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            yield _convert(node, file, loader), Where(file, node.start_mark.line + 1)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        what = "a NUL byte" if exc.character in (0, "\0") else f"character #x{_ord(exc.character):04x}"
        raise YamlSyntaxError(f"{file}:{line}: invalid YAML: {what} is not allowed in YAML text") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlSyntaxError(f"{file}:{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"{file}:0: invalid YAML: {exc}") from exc
    except RecursionError as exc:  # belt and braces: the depth cap should come first
        raise YamlSyntaxError(f"{file}:0: invalid YAML: nested too deeply") from exc
    finally:
        if loader is not None:
            loader.dispose()


def _ord(c: Any) -> int:
    return c if isinstance(c, int) else ord(c)


def load_one(text: str, file: str, *, aliases: bool = True) -> Any:
    """The single document of ``text`` (None if empty); more than one is an error.

    Used for the operator's own config file, where anchors and aliases are allowed (the
    expansion is still capped at :data:`MAX_NODES` values).
    """
    docs = list(load_documents(text, file, aliases=aliases))
    if not docs:
        return None
    if len(docs) > 1:
        raise YamlSyntaxError(f"{docs[1][1]}: expected a single YAML document")
    return docs[0][0]
