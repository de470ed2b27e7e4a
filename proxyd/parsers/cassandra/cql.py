"""A CQL tokenizer and statement classifier: what does a statement do, and to which object.

The classifier answers, for one CQL string, a list of :class:`Statement` (one, or one per member
of a ``BEGIN BATCH ... APPLY BATCH``), each with Cilium's ``query_action`` name (``select``,
``create-table``, ``grant-permission``, ...) and the object it names as a :class:`Name`
(``keyspace`` may be None for an unqualified name; the parser resolves it against the
connection's keyspace).

It tokenizes first, so comments (``--``, ``//``, ``/* */``), string literals (``'it''s'`` and
``$$ ... $$``) and quoted identifiers (``"My Table"``, case kept) can never be mistaken for
keywords or names; unquoted identifiers are case-folded as Cassandra does. A string that does not
tokenize, or whose shape is not understood (including two statements in one QUERY, which
Cassandra rejects), is classified ``invalid`` so that only an allow-all rule lets it through.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Final

# Token kinds.
WORD: Final = "w"  # unquoted identifier or keyword (lowercased), or a number-like word
QUOTED: Final = "q"  # "quoted identifier" (case kept, "" unescaped)
STRING: Final = "s"  # 'string' or $$string$$ literal
PUNCT: Final = "p"  # any other single character

INVALID: Final = "invalid"


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class Name:
    """A possibly keyspace-qualified object name (table, view, function, keyspace...)."""

    keyspace: str | None
    name: str


@dataclass(frozen=True, slots=True)
class Statement:
    """One classified statement.

    ``scope`` says how the policy's ``query_table`` sees ``target``: ``table`` (resolve an
    unqualified name against the current keyspace), ``keyspace`` (the name is a keyspace) or
    ``none`` (roles, users, permissions: no table).
    """

    action: str
    target: Name | None
    scope: str = "table"


class TokenizeError(Exception):
    pass


_WORD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SPACE: Final = frozenset(" \t\r\n\f\v")
MAX_TOKENS: Final = 200_000


def tokenize(text: str) -> list[Token]:
    """Split CQL into tokens, dropping whitespace and comments.

    Raises :class:`TokenizeError` on an unterminated string, identifier or comment.
    """
    out: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c in _WORD_CHARS:
            j = i + 1
            while j < n and text[j] in _WORD_CHARS:
                j += 1
            out.append(Token(WORD, text[i:j].lower()))
            i = j
        elif c == "'":
            parts = []
            j = i + 1
            while True:
                k = text.find("'", j)
                if k < 0:
                    raise TokenizeError("unterminated string literal")
                parts.append(text[j:k])
                if k + 1 < n and text[k + 1] == "'":
                    parts.append("'")
                    j = k + 2
                    continue
                i = k + 1
                break
            out.append(Token(STRING, "".join(parts)))
        elif c == '"':
            parts = []
            j = i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise TokenizeError("unterminated quoted identifier")
                parts.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            out.append(Token(QUOTED, "".join(parts)))
        elif c == "$" and text.startswith("$$", i):
            k = text.find("$$", i + 2)
            if k < 0:
                raise TokenizeError("unterminated $$ string")
            out.append(Token(STRING, text[i + 2 : k]))
            i = k + 2
        elif (c == "-" and text.startswith("--", i)) or (c == "/" and text.startswith("//", i)):
            k = text.find("\n", i)
            i = n if k < 0 else k + 1
        elif c == "/" and text.startswith("/*", i):
            k = text.find("*/", i + 2)
            if k < 0:
                raise TokenizeError("unterminated comment")
            i = k + 2
        else:
            out.append(Token(PUNCT, c))
            i += 1
        if len(out) > MAX_TOKENS:
            raise TokenizeError("statement too long")
    return out


class _Shape(Exception):
    """The statement's shape is not understood."""


class _Cursor:
    __slots__ = ("i", "toks")

    def __init__(self, toks: list[Token]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def word(self, k: int = 0) -> str | None:
        t = self.peek(k)
        return t.text if t is not None and t.kind == WORD else None

    def accept(self, *words: str) -> bool:
        """Consume the keyword sequence ``words`` if it is next."""
        for k, w in enumerate(words):
            if self.word(k) != w:
                return False
        self.i += len(words)
        return True

    def expect(self, *words: str) -> None:
        if not self.accept(*words):
            raise _Shape(f"expected {' '.join(words)}")

    def ident(self) -> str:
        t = self.peek()
        if t is None or t.kind not in (WORD, QUOTED) or (t.kind == WORD and not _is_ident(t.text)):
            raise _Shape("expected a name")
        self.i += 1
        return t.text

    def name(self) -> Name:
        first = self.ident()
        t = self.peek()
        if t is not None and t.kind == PUNCT and t.text == ".":
            self.i += 1
            return Name(first, self.ident())
        return Name(None, first)

    def if_exists(self) -> None:
        self.accept("if", "exists")

    def if_not_exists(self) -> None:
        self.accept("if", "not", "exists")


def _is_ident(w: str) -> bool:
    return bool(w) and not w[0].isdigit()


def classify(text: str) -> list[Statement]:
    """Classify one QUERY/PREPARE string; never raises.

    Returns one statement, or one per member of a CQL ``BEGIN BATCH``; ``invalid`` when the
    string does not tokenize or its shape is not understood.
    """
    try:
        toks = tokenize(text)
    except TokenizeError:
        return [Statement(INVALID, None, "none")]
    try:
        cur = _Cursor(toks)
        if cur.word() == "begin":
            return _batch(cur)
        st = _statement(cur)
        _end(cur)
        return [st]
    except _Shape:
        return [Statement(INVALID, None, "none")]


def _end(cur: _Cursor) -> None:
    """Only semicolons may follow a statement (Cassandra rejects a second one)."""
    while (t := cur.peek()) is not None:
        if t.kind == PUNCT and t.text == ";":
            cur.i += 1
            continue
        raise _Shape("text after the statement")


_BATCH_MEMBER: Final = frozenset({"insert", "update", "delete"})


def _batch(cur: _Cursor) -> list[Statement]:
    cur.expect("begin")
    cur.accept("unlogged") or cur.accept("counter")
    cur.expect("batch")
    # Members start at the reserved words INSERT/UPDATE/DELETE (which cannot be unquoted
    # identifiers) at parenthesis depth 0; the batch ends at APPLY BATCH.
    toks = cur.toks
    starts: list[int] = []
    depth = 0
    end = -1
    for j in range(cur.i, len(toks)):
        t = toks[j]
        if t.kind == PUNCT:
            if t.text in "([{":
                depth += 1
            elif t.text in ")]}":
                depth -= 1
        elif t.kind == WORD and depth == 0:
            if t.text in _BATCH_MEMBER:
                starts.append(j)
            elif (
                t.text == "apply"
                and j + 1 < len(toks)
                and toks[j + 1].kind == WORD
                and toks[j + 1].text == "batch"
            ):
                end = j
                break
    if end < 0 or not starts:
        raise _Shape("batch without APPLY BATCH or members")
    # Between BATCH and the first member only USING TIMESTAMP n may appear.
    head = toks[cur.i : starts[0]]
    if head and not (len(head) == 3 and head[0].text == "using" and head[1].text == "timestamp"):
        raise _Shape("unexpected text before the first batch member")
    out: list[Statement] = []
    bounds = [*starts, end]
    for a, b in itertools.pairwise(bounds):
        sub = _Cursor(toks[a:b])
        out.append(_statement(sub))
        _end(sub)
    cur.i = end + 2
    _end(cur)
    return out


def _statement(cur: _Cursor) -> Statement:
    st = _statement_head(cur)
    _skip_rest(cur)
    return st


def _statement_head(cur: _Cursor) -> Statement:
    w = cur.word()
    if w is None:
        raise _Shape("no statement")
    cur.i += 1
    if w == "select":
        return Statement("select", _after_from(cur))
    if w == "delete":
        return Statement("delete", _after_from(cur))
    if w == "insert":
        cur.expect("into")
        return Statement("insert", cur.name())
    if w == "update":
        return Statement("update", cur.name())
    if w == "use":
        return Statement("use", Name(None, cur.ident()), "keyspace")
    if w == "truncate":
        cur.accept("table") or cur.accept("columnfamily")
        return Statement("truncate-table", cur.name())
    if w == "create":
        return _create(cur)
    if w == "alter":
        return _alter(cur)
    if w == "drop":
        return _drop(cur)
    if w == "grant":
        return _grant_revoke(cur, "grant", "to")
    if w == "revoke":
        return _grant_revoke(cur, "revoke", "from")
    if w == "list":
        return _list(cur)
    raise _Shape(f"unknown statement {w!r}")


def _after_from(cur: _Cursor) -> Name:
    """The name after the first FROM at parenthesis depth 0 (SELECT and DELETE)."""
    depth = 0
    while (t := cur.peek()) is not None:
        if t.kind == PUNCT:
            if t.text in "([{":
                depth += 1
            elif t.text in ")]}":
                depth -= 1
        elif t.kind == WORD and t.text == "from" and depth == 0:
            cur.i += 1
            return cur.name()
        cur.i += 1
    raise _Shape("no FROM")


def _skip_rest(cur: _Cursor) -> None:
    """Move to the ``;`` that ends the statement (or the end): what :func:`_end` then checks."""
    while (t := cur.peek()) is not None and not (t.kind == PUNCT and t.text == ";"):
        cur.i += 1


def _create(cur: _Cursor) -> Statement:
    cur.accept("or", "replace")
    cur.accept("custom")
    w = cur.word()
    if w is None:
        raise _Shape("CREATE what?")
    cur.i += 1
    if w == "keyspace" or w == "schema":
        cur.if_not_exists()
        st = Statement("create-keyspace", Name(None, cur.ident()), "keyspace")
    elif w == "table" or w == "columnfamily":
        cur.if_not_exists()
        st = Statement("create-table", cur.name())
    elif w == "index":
        # CREATE [CUSTOM] INDEX [IF NOT EXISTS] [name] ON ks.t (...): the table it indexes.
        cur.if_not_exists()
        if cur.word() != "on":
            cur.ident()
        cur.expect("on")
        st = Statement("create-index", cur.name())
    elif w == "materialized":
        cur.expect("view")
        cur.if_not_exists()
        st = Statement("create-materialized-view", cur.name())
    elif w == "role":
        st = Statement("create-role", None, "none")
    elif w == "user":
        st = Statement("create-user", None, "none")
    elif w in ("function", "aggregate", "type"):
        cur.if_not_exists()
        st = Statement(f"create-{w}", cur.name())
    elif w == "trigger":
        cur.if_not_exists()
        cur.ident()
        cur.expect("on")
        st = Statement("create-trigger", cur.name())
    else:
        raise _Shape(f"CREATE {w}")
    _skip_rest(cur)
    return st


def _alter(cur: _Cursor) -> Statement:
    w = cur.word()
    if w is None:
        raise _Shape("ALTER what?")
    cur.i += 1
    if w == "keyspace" or w == "schema":
        cur.if_exists()
        st = Statement("alter-keyspace", Name(None, cur.ident()), "keyspace")
    elif w == "table" or w == "columnfamily":
        cur.if_exists()
        st = Statement("alter-table", cur.name())
    elif w == "materialized":
        cur.expect("view")
        cur.if_exists()
        st = Statement("alter-materialized-view", cur.name())
    elif w in ("role", "user"):
        st = Statement(f"alter-{w}", None, "none")
    elif w == "type":
        cur.if_exists()
        st = Statement("alter-type", cur.name())
    else:
        raise _Shape(f"ALTER {w}")
    _skip_rest(cur)
    return st


def _drop(cur: _Cursor) -> Statement:
    w = cur.word()
    if w is None:
        raise _Shape("DROP what?")
    cur.i += 1
    if w == "keyspace" or w == "schema":
        cur.if_exists()
        st = Statement("drop-keyspace", Name(None, cur.ident()), "keyspace")
    elif w == "table" or w == "columnfamily":
        cur.if_exists()
        st = Statement("drop-table", cur.name())
    elif w == "index":
        cur.if_exists()
        st = Statement("drop-index", cur.name())
    elif w == "materialized":
        cur.expect("view")
        cur.if_exists()
        st = Statement("drop-materialized-view", cur.name())
    elif w in ("role", "user"):
        st = Statement(f"drop-{w}", None, "none")
    elif w in ("function", "aggregate", "type"):
        cur.if_exists()
        st = Statement(f"drop-{w}", cur.name())
    elif w == "trigger":
        # DROP TRIGGER [IF EXISTS] name ON ks.t
        cur.if_exists()
        cur.ident()
        cur.expect("on")
        st = Statement("drop-trigger", cur.name())
    else:
        raise _Shape(f"DROP {w}")
    _skip_rest(cur)
    return st


def _grant_revoke(cur: _Cursor, verb: str, prep: str) -> Statement:
    """GRANT/REVOKE a permission (``... ON resource TO|FROM role``) or a role (no ON)."""
    rest = cur.toks[cur.i :]
    words = [t.text for t in rest if t.kind == WORD]
    if prep not in words:
        raise _Shape(f"{verb} without {prep.upper()}")
    before = words[: words.index(prep)]
    _skip_rest(cur)
    if "on" in before:
        return Statement(f"{verb}-permission", None, "none")
    return Statement(f"{verb}-role", None, "none")


def _list(cur: _Cursor) -> Statement:
    w = cur.word()
    _skip_rest(cur)
    if w == "roles":
        return Statement("list-roles", None, "none")
    if w == "users":
        return Statement("list-users", None, "none")
    if w is None:
        raise _Shape("LIST what?")
    return Statement("list-permissions", None, "none")


#: Every action the classifier can produce (besides ``invalid``), and how each sees a table.
ACTIONS: Final = {
    "select": "table",
    "insert": "table",
    "update": "table",
    "delete": "table",
    "use": "keyspace",
    "create-table": "table",
    "drop-table": "table",
    "alter-table": "table",
    "truncate-table": "table",
    "create-keyspace": "keyspace",
    "alter-keyspace": "keyspace",
    "drop-keyspace": "keyspace",
    "create-index": "table",
    "drop-index": "table",
    "create-materialized-view": "table",
    "alter-materialized-view": "table",
    "drop-materialized-view": "table",
    "create-role": "none",
    "alter-role": "none",
    "drop-role": "none",
    "grant-role": "none",
    "revoke-role": "none",
    "list-roles": "none",
    "grant-permission": "none",
    "revoke-permission": "none",
    "list-permissions": "none",
    "create-user": "none",
    "alter-user": "none",
    "drop-user": "none",
    "list-users": "none",
    "create-function": "table",
    "drop-function": "table",
    "create-aggregate": "table",
    "drop-aggregate": "table",
    "create-type": "table",
    "alter-type": "table",
    "drop-type": "table",
    "create-trigger": "table",
    "drop-trigger": "table",
}
