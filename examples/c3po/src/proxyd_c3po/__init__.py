"""c3po: the tutorial parser of Cilium's Go-extension announcement, as a proxyd plugin.

Wire format: CRLF-terminated text lines. Lines from the client are requests; lines from the
server are replies and pass without being parsed.

Verdicts: a request line containing the banned word (``C-3PO`` unless configured otherwise) is
dropped and logged as denied, whatever the policy says (that is the whole point of the original
example). Every other request is checked against the policy with ``ctx.matches()``: allowed
lines pass, denied ones are dropped. A line longer than ``MAX_LINE`` bytes is a protocol error.

Denied requests get no answer by default, as in the original tutorial: a line protocol with no
defined error reply cannot know what its client would understand. Set ``deny_reply`` in the
listener's ``parser_config`` to send a line back in place of each dropped request (it is sent at
once, so a client that pipelines requests may see it before the replies to earlier ones; the
built-in r2d2 parser shows how to keep such answers in order)::

    listeners:
      - name: droids
        address: "0.0.0.0:15010"
        l7proto: c3po
        parser_config:
          banned: "C-3PO"              # default
          deny_reply: "ERROR go away"  # default: none (drop silently)

Policy rule key: ``line``, a regular expression searched in the request line::

    toPorts:
      - ports: [{port: "5555", protocol: TCP}]
        rules:
          l7proto: c3po
          l7:
            - line: "^hello"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.errors import ParserConfigError, RuleError
from proxyd.ops import DROP, ERROR, ERROR_INVALID_FRAME_LENGTH, MORE, NOP_VERDICT, PASS, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, Parser, ParserFactory, RuleMatcher

__all__ = ["MAX_LINE", "C3poConfig", "C3poFactory", "C3poParser", "C3poRequest", "C3poRule"]

#: A request line (with its CRLF) longer than this is a protocol error, not a growing buffer.
MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class C3poRequest:
    """One parsed request: what policy rules see. Decoded as latin-1, so no byte is lost."""

    line: str


@dataclass(frozen=True, slots=True)
class C3poRule:
    """A compiled ``l7`` rule; ``line=None`` (the rule ``{}``) allows every request."""

    line: re.Pattern[str] | None

    def matches(self, request: Any) -> bool:
        if not isinstance(request, C3poRequest):
            return False
        return self.line is None or self.line.search(request.line) is not None


@dataclass(frozen=True, slots=True)
class C3poConfig:
    """A listener's validated ``parser_config``."""

    banned: bytes = b"C-3PO"
    deny_reply: bytes | None = None  # the line (with CRLF) sent for a dropped request


class C3poParser(Parser):
    """One per connection. Holds no state of its own: each call looks at one line."""

    __slots__ = ("config", "ctx")

    def __init__(self, ctx: ConnectionContext, config: C3poConfig) -> None:
        self.ctx = ctx
        self.config = config

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if reply:
            # Replies pass unparsed: forward whatever arrived, however it was segmented.
            return (PASS, len(data)) if data else NOP_VERDICT
        # Look for the line end only within MAX_LINE bytes, so the limit holds the same
        # whether the line arrived in one piece or byte by byte.
        end = data.find(b"\r\n", 0, MAX_LINE)
        if end < 0:
            if len(data) >= MAX_LINE:
                return ERROR, ERROR_INVALID_FRAME_LENGTH
            return MORE, 1  # no complete line yet: call again when one more byte is in
        n = end + 2  # the line and its CRLF
        raw = bytes(data[:end])
        request = C3poRequest(raw.decode("latin-1"))
        fields = {"line": request.line}
        if self.config.banned in raw:
            return self._deny(fields, "banned", n)
        if not self.ctx.matches(request):
            return self._deny(fields, "policy", n)
        self.ctx.log(EntryType.REQUEST, fields)
        return PASS, n

    def _deny(self, fields: dict[str, str], reason: str, n: int) -> Verdict:
        self.ctx.log(EntryType.DENIED, {**fields, "reason": reason})
        if self.config.deny_reply is not None:
            self.ctx.inject(True, self.config.deny_reply)  # toward the client, promptly
        return DROP, n


class C3poFactory(ParserFactory):
    """Registered through the ``proxyd.parsers`` entry point ``c3po`` (see pyproject.toml)."""

    name = "c3po"
    rule_keys = ("line",)
    description = "CRLF lines; drops requests mentioning C-3PO (Cilium's Go-extension tutorial)"

    def validate_config(self, config: Mapping[str, Any]) -> C3poConfig:
        default = C3poConfig()
        banned, deny_reply = default.banned, default.deny_reply
        for key, value in config.items():
            if key == "banned":
                if not isinstance(value, str) or not value or _has_line_end(value):
                    raise ParserConfigError("must be a non-empty string without CR or LF", key)
                banned = value.encode("latin-1", "replace")
            elif key == "deny_reply":
                if value is None:
                    deny_reply = None
                elif not isinstance(value, str) or _has_line_end(value):
                    raise ParserConfigError("must be a string without CR or LF, or null", key)
                else:
                    deny_reply = value.encode("latin-1", "replace") + b"\r\n"
            else:
                raise ParserConfigError("unknown key for parser 'c3po' (known: banned, deny_reply)", str(key))
        return C3poConfig(banned, deny_reply)

    def compile_rule(self, rule: Mapping[str, str]) -> RuleMatcher:
        pattern: re.Pattern[str] | None = None
        for key, value in rule.items():
            if key != "line":
                raise RuleError("unknown rule key for l7proto 'c3po' (known: line)", key)
            try:
                pattern = re.compile(str(value))
            except re.error as exc:
                raise RuleError(f"bad regular expression {value!r}: {exc}", key) from exc
        return C3poRule(pattern)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        # ``config`` is what validate_config returned; None when a test builds the parser bare.
        return C3poParser(ctx, config if isinstance(config, C3poConfig) else C3poConfig())


def _has_line_end(value: str) -> bool:
    return "\r" in value or "\n" in value
