"""YAML loading that remembers where every value came from, for ``file:line: key: problem`` errors.

PyYAML's composed node tree has the marks; :func:`load_documents` turns it into plain dicts and
lists (subclasses :class:`LMap` and :class:`LList`) that carry the line of each key or item, so
validators can report the exact place of a bad value without a schema library.
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


class YamlSyntaxError(Exception):
    """The file is not valid YAML; the message is ``file:line: problem``."""


def _convert(node: yaml.Node, file: str, constructor: yaml.constructor.SafeConstructor) -> Any:
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


def load_documents(text: str, file: str) -> Iterator[tuple[Any, Where]]:
    """Yield each YAML document of ``text`` (converted) with where it starts.

    Raises :class:`YamlSyntaxError` for malformed YAML. Empty documents are skipped.
    """
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            yield _convert(node, file, loader), Where(file, node.start_mark.line + 1)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlSyntaxError(f"{file}:{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"{file}:0: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()


def load_one(text: str, file: str) -> Any:
    """The single document of ``text`` (None if empty); more than one is an error."""
    docs = list(load_documents(text, file))
    if not docs:
        return None
    if len(docs) > 1:
        raise YamlSyntaxError(f"{docs[1][1]}: expected a single YAML document")
    return docs[0][0]
