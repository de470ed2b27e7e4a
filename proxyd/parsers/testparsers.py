"""The framework's own test parsers: small protocols that exercise every op of the engine.

Not built-ins: the test suite registers them through the ``proxyd.parsers`` entry points of
tests/parser_plugins (see its README), so a daemon outside the suite never offers them.

- ``test.passer``: passes everything (the L7 path with no protocol cost; used by benchmarks).
- ``test.lineparser``: ``\\n``-terminated lines, both directions. A line starting with
  ``DROP`` is dropped; ``INJECT`` is dropped and its text is sent back in the same direction
  with the INJECT op; ``REPLY x`` is dropped and ``x\\n`` is injected toward the other direction;
  ``ERROR`` is a protocol error; ``BOOM`` raises (for sandbox tests); anything else passes,
  after a policy check on the client side (the request is the line, without ``\\n``).
- ``test.blockparser``: blocks ``<len>:<flag><payload>`` where ``len`` counts the whole block
  including its header. The verdict is decided from the header alone, so PASS and DROP reach past
  the buffered bytes: flag ``P`` passes, ``D`` drops, ``I`` passes and injects ``ACK <len>\\n``
  toward the other direction once the block is through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxyd.errors import ParserConfigError
from proxyd.ops import (
    DROP,
    ERROR,
    ERROR_INVALID_FRAME_LENGTH,
    ERROR_INVALID_FRAME_TYPE,
    INJECT,
    MORE,
    NOP_VERDICT,
    PASS,
    Verdict,
)
from proxyd.parser import ConnectionContext, Data, EntryType, Parser, ParserFactory


class Passer(Parser):
    __slots__ = ()

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        return (PASS, len(data)) if data else NOP_VERDICT


class PasserFactory(ParserFactory):
    description = "passes every byte (test and benchmark parser)"

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return Passer()


class LineParser(Parser):
    __slots__ = ("_drop_next", "ctx")

    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx
        self._drop_next = [0, 0]  # per direction: an INJECT-ed line still to be dropped

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if self._drop_next[reply]:
            n, self._drop_next[reply] = self._drop_next[reply], 0
            return DROP, n
        end = data.find(b"\n")
        if end < 0:
            return MORE, 1
        n = end + 1
        line = bytes(data[:end])
        if line.startswith(b"DROP"):
            return DROP, n
        if line.startswith(b"INJECT"):
            # INJECT does not consume input: send the copy now, drop the original next call.
            self.ctx.inject(reply, line + b"\n")
            self._drop_next[reply] = n
            return INJECT, n
        if line.startswith(b"REPLY "):
            self.ctx.inject(not reply, line[6:] + b"\n")
            return DROP, n
        if line.startswith(b"ERROR"):
            return ERROR, ERROR_INVALID_FRAME_TYPE
        if line.startswith(b"BOOM"):
            raise RuntimeError("test parser exploded on request")
        if not reply:
            request = line.decode("latin-1")
            if not self.ctx.matches(request):
                self.ctx.log(EntryType.DENIED, {"line": request})
                self.ctx.inject(True, b"DENIED\n")
                return DROP, n
            self.ctx.log(EntryType.REQUEST, {"line": request})
        return PASS, n


class LineParserFactory(ParserFactory):
    description = "newline-terminated test protocol exercising DROP, INJECT and ERROR"
    rule_keys = ("line", "prefix")

    def compile_rule(self, rule: Mapping[str, Any]) -> Any:
        from proxyd.errors import RuleError

        for key in rule:
            if key not in ("line", "prefix"):
                raise RuleError("unknown rule key for l7proto 'test.lineparser' (known: line, prefix)", key)
        return _LineRule(rule.get("line"), rule.get("prefix"))

    def validate_config(self, config: Mapping[str, Any]) -> Any:
        for key in config:
            if key != "boom_on_create":
                raise ParserConfigError("unknown key (known: boom_on_create)", key)
        return dict(config)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        if config and config.get("boom_on_create"):
            raise RuntimeError("test factory exploded on create")
        return LineParser(ctx)


class _LineRule:
    __slots__ = ("line", "prefix")

    def __init__(self, line: str | None, prefix: str | None) -> None:
        self.line = line
        self.prefix = prefix

    def matches(self, request: Any) -> bool:
        if self.line is not None and request != self.line:
            return False
        return self.prefix is None or str(request).startswith(self.prefix)


class BlockParser(Parser):
    __slots__ = ("ctx",)

    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        colon = data.find(b":", 0, 12)
        if colon < 0:
            if len(data) >= 12:
                return ERROR, ERROR_INVALID_FRAME_LENGTH
            return MORE, 1
        if len(data) < colon + 2:
            return MORE, colon + 2 - len(data)
        try:
            length = int(bytes(data[:colon]))
        except ValueError:
            return ERROR, ERROR_INVALID_FRAME_LENGTH
        if length < colon + 2:
            return ERROR, ERROR_INVALID_FRAME_LENGTH
        flag = data[colon + 1]
        if flag == ord("P"):
            return PASS, length
        if flag == ord("D"):
            return DROP, length
        if flag == ord("I"):
            self.ctx.inject(not reply, b"ACK %d\n" % length)
            return PASS, length
        return ERROR, ERROR_INVALID_FRAME_TYPE


class BlockParserFactory(ParserFactory):
    description = "length-prefixed test protocol exercising PASS/DROP past the buffered bytes"

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return BlockParser(ctx)
