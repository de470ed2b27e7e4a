"""YAML loading that remembers where every value came from, for ``file:line: key: problem`` errors.

PyYAML's composed node tree has the marks; :func:`load_documents` turns it into plain dicts and
lists (subclasses :class:`LMap` and :class:`LList`) that carry the line of each key or item, so
validators can report the exact place of a bad value without a schema library.

Hostile input is refused, never expanded (policy text arrives over the admin API): by default
anchors and aliases are refused outright (``aliases=False``), so a document's expanded size is
its text's size and a "billion laughs" document is one clear error; nesting deeper than
:data:`MAX_DEPTH` is refused too, and so is a document expanding to more values than
:func:`max_values` allows for its text (a fixed floor plus one per character, so a large but
honest file, such as 100,000 identities, loads). Every malformed input, NUL bytes and other
characters YAML forbids included, is a :class:`YamlSyntaxError` naming the place, never
another exception.

Speed: where PyYAML has libyaml, the text is scanned and composed in C (ten times faster than
PyYAML's pure-Python parser, which dominated loading 10,000 policy documents). The C composer
has no depth or alias guard of its own, so the event stream is checked first (anchors, aliases,
depth), in C-built events, before anything is composed. Any input the C path refuses is parsed
again by the pure-Python path, whose messages are the ones users see.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

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


class TextParts:
    """A text held in parts (a large config, read a slice at a time): parsed without ever being
    one string (see :func:`proxyd.config.read_parts`); ``str()`` joins it."""

    __slots__ = ("_len", "parts")

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts
        self._len = sum(map(len, parts))

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return "".join(self.parts)


class _Reader:
    """libyaml's input a slice at a time. Given one string, PyYAML encodes all of it to UTF-8 in
    one call: for a 7 MB config, 7 MB of memory first touched with the interpreter lock held
    (10-20 ms of a stalled event loop while a SIGHUP reload parses on a worker thread)."""

    __slots__ = ("index", "parts", "pos")

    def __init__(self, text: str | TextParts) -> None:
        self.parts = text.parts if isinstance(text, TextParts) else [text]
        self.index = 0
        self.pos = 0

    def read(self, size: int) -> str:
        while self.index < len(self.parts):
            part = self.parts[self.index]
            if self.pos < len(part):
                chunk = part[self.pos : self.pos + size]
                self.pos += len(chunk)
                return chunk
            self.index += 1
            self.pos = 0
        return ""


#: Deepest nesting of mappings and sequences accepted (a CiliumNetworkPolicy needs about 10).
MAX_DEPTH = 100
#: Most values one YAML document may produce (after alias expansion, where aliases are
#: allowed) on top of one per character of its text: see :func:`max_values`.
MAX_NODES = 1_000_000


def max_values(text: str | TextParts) -> int:
    """The value cap for a document of ``text``: it scales with the file (without aliases a
    value takes at least about one character), so only alias expansion can reach it."""
    return MAX_NODES + len(text)


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
        self.max_nodes = max_values(text)

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


class _Counter(Protocol):
    nodes: int
    max_nodes: int

    def flatten_mapping(self, node: yaml.MappingNode) -> None: ...

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any: ...


def _convert(node: yaml.Node, file: str, constructor: _Counter) -> Any:
    constructor.nodes += 1
    if constructor.nodes > constructor.max_nodes:
        raise YamlSyntaxError(
            f"{file}:{node.start_mark.line + 1}: invalid YAML: more than {constructor.max_nodes} values"
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


def load_documents(text: str | TextParts, file: str, *, aliases: bool = False) -> Iterator[tuple[Any, Where]]:
    """Yield each YAML document of ``text`` (converted) with where it starts.

    Raises :class:`YamlSyntaxError` for malformed YAML, for anchors and aliases unless
    ``aliases`` (see the module docstring), and for input over the depth and size caps.
    Empty documents are skipped.
    """
    fast = _fast_documents(text, file, aliases)
    if fast is not None:
        yield from fast
        return
    text = str(text)  # refused by the C path: the pure-Python one words why
    loader: _Loader | None = None
    try:
        loader = _Loader(text, file, aliases)  # the reader checks every character here
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            loader.nodes = 0  # the cap is per document
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


if yaml.__with_libyaml__:

    class _CLoader(yaml.CSafeLoader):
        """libyaml's parser and composer with PyYAML's safe constructor and resolver."""

        def __init__(self, text: Any, max_nodes: int) -> None:
            super().__init__(text)
            self.nodes = 0
            self.max_nodes = max_nodes


_STR_TAG = "tag:yaml.org,2002:str"
#: Most distinct plain scalars whose resolved tag one text remembers: enough for the values
#: that repeat (label values, ports), small enough that the table never grows large (100,000
#: distinct CIDRs filled 65,536 entries, and growing a table that size in one call stalls the
#: event loop while a SIGHUP parses the config on a worker thread).
RESOLVED_CACHE = 4096
_MAP_TAGS = (None, "!", "tag:yaml.org,2002:map")
_SEQ_TAGS = (None, "!", "tag:yaml.org,2002:seq")


class _NeedsNodes(Exception):
    """The text has anchors or aliases (allowed here): compose nodes to expand them."""


def _has_forbidden(text: str | TextParts) -> bool:
    """Whether ``text`` holds a character YAML forbids (the pure-Python path then words it).

    Searched in slices: one search over a 7 MB file (100,000 identities) holds the interpreter
    lock for tens of milliseconds, stalling the event loop while a reload runs on a worker."""
    search = yaml.reader.Reader.NON_PRINTABLE.search
    parts = text.parts if isinstance(text, TextParts) else [text]
    return any(search(part, i, i + _SLICE) for part in parts for i in range(0, len(part), _SLICE))


_SLICE = 1 << 16


def _fast_documents(text: str | TextParts, file: str, aliases: bool) -> list[tuple[Any, Where]] | None:
    """The documents of ``text`` through libyaml, or None: no libyaml, or the text is refused
    (then the pure-Python path reports why, in its words)."""
    if not yaml.__with_libyaml__ or _has_forbidden(text):
        return None
    try:
        try:
            return _from_events(text, file, aliases)
        except _NeedsNodes:
            return _from_nodes(text, file)
    except (yaml.YAMLError, YamlSyntaxError, RecursionError, ValueError, TypeError, KeyError):
        return None


class _Refused(Exception):
    """Something the pure-Python path must report (depth, anchor, duplicate key, tag...)."""


def _from_events(text: str | TextParts, file: str, aliases: bool) -> list[tuple[Any, Where]] | None:
    """Build the values straight from libyaml's events: no node tree, and a plain scalar is
    resolved (bool, int, null...) only when its first character can start such a value."""
    loader = _CLoader(_Reader(text), 0)
    resolvers = loader.yaml_implicit_resolvers
    constructors = loader.yaml_constructors
    cap = max_values(text)
    out: list[tuple[Any, Where]] = []
    # The open containers: (value, pending key or _NO_KEY, line of the pending key).
    stack: list[list[Any]] = []
    nodes = 0
    doc_line = 0
    # Locals, not module attributes: this loop runs once per value (a million for 100,000
    # identities), and each global lookup shows.
    scalar_event, map_event, seq_event = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    end_events = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    stream_end, alias_event = yaml.StreamEndEvent, yaml.AliasEvent
    resolve: Any = loader.resolve
    get_event, scalar_node = loader.get_event, yaml.ScalarNode
    str_tag, no_key, lmap, llist, where = _STR_TAG, _NO_KEY, LMap, LList, Where
    resolved: dict[str, str] = {}
    try:
        while True:
            event: Any = get_event()  # the C parser's events: attributes by kind
            kind = type(event)
            if kind is scalar_event:
                if event.anchor is not None:
                    if not aliases:
                        return None
                    raise _NeedsNodes
                nodes += 1
                if nodes > cap:
                    return None
                tag = event.tag
                text_value = event.value
                if tag is None or tag == "!":
                    if event.implicit[0] and (not text_value or text_value[:1] in resolvers):
                        # Plain scalars repeat (label values, keys): resolve each text once.
                        tag = resolved.get(text_value)
                        if tag is None:
                            tag = resolve(scalar_node, text_value, event.implicit)
                            if len(resolved) < RESOLVED_CACHE:
                                resolved[text_value] = tag
                    else:
                        tag = str_tag
                if tag == str_tag:
                    value: Any = text_value
                else:
                    make = constructors.get(tag)
                    if make is None:
                        return None
                    value = make(
                        loader, scalar_node(tag, text_value, event.start_mark, event.end_mark, event.style)
                    )
                if not stack:
                    out.append((value, where(file, event.start_mark.line + 1)))
                    nodes = 0
                    continue
                top = stack[-1]
                parent = top[0]
                if type(parent) is llist:
                    parent.append(value)
                    parent.item_lines.append(event.start_mark.line + 1)
                elif top[1] is no_key:
                    key = value if type(value) is str else str(value)
                    if key in parent or (key == "<<" and event.tag is None and event.implicit[0]):
                        return None  # duplicate, or a merge key (the node path flattens it)
                    top[1], top[2] = key, event.start_mark.line + 1
                else:
                    parent[top[1]] = value
                    parent.key_lines[top[1]] = top[2]
                    top[1] = no_key
            elif kind is map_event or kind is seq_event:
                if event.anchor is not None:
                    if not aliases:
                        return None
                    raise _NeedsNodes
                nodes += 1
                if nodes > cap or len(stack) >= MAX_DEPTH:
                    return None
                line = event.start_mark.line + 1
                if kind is map_event:
                    if event.tag not in _MAP_TAGS:
                        return None
                    value = lmap()
                    value.where = where(file, line)
                    value.key_lines = {}
                else:
                    if event.tag not in _SEQ_TAGS:
                        return None
                    value = llist()
                    value.where = where(file, line)
                    value.item_lines = []
                if stack:
                    top = stack[-1]
                    parent = top[0]
                    if type(parent) is llist:
                        parent.append(value)
                        parent.item_lines.append(line)
                    elif top[1] is no_key:
                        return None  # a mapping key must be a scalar
                    else:
                        parent[top[1]] = value
                        parent.key_lines[top[1]] = top[2]
                        top[1] = no_key
                else:
                    doc_line = line
                stack.append([value, no_key, 0])
            elif kind in end_events:
                done = stack.pop()
                if not stack:
                    out.append((done[0], where(file, doc_line)))
                    nodes = 0
            elif kind is alias_event:
                if not aliases:
                    return None
                raise _NeedsNodes
            elif kind is stream_end:
                break
    finally:
        loader.dispose()
    return out


_NO_KEY: Any = object()


def _from_nodes(text: str | TextParts, file: str) -> list[tuple[Any, Where]] | None:
    """Compose in C (aliases expand by sharing nodes), then convert, counting the expansion.

    Only reached for the operator's config with anchors; the event pass already checked depth
    (libyaml's composer has no guard of its own)."""
    probe = _CLoader(_Reader(text), 0)
    try:
        depth = 0
        while probe.check_event():
            event = probe.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    return None
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    finally:
        probe.dispose()
    loader = _CLoader(_Reader(text), max_values(text))
    out: list[tuple[Any, Where]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            loader.nodes = 0
            out.append((_convert(node, file, loader), Where(file, node.start_mark.line + 1)))
    finally:
        loader.dispose()
    return out


def _ord(c: Any) -> int:
    return c if isinstance(c, int) else ord(c)


def load_one(text: str | TextParts, file: str, *, aliases: bool = True) -> Any:
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
