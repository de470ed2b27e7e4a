"""r2d2: the tutorial protocol of Cilium's Go-extension announcement.

Wire format: the client sends CRLF-terminated requests ``READ <file>``, ``WRITE <file>``,
``HALT`` and ``RESET``; the server answers each with one CRLF-terminated line. Replies are passed
without being interpreted, but their line ends are counted so that a denied request's
``ERROR\\r\\n`` reaches the client *in its place*: after the replies of the requests before it,
before those of the requests after it (a pipelining client matches replies by order).

Policy rule keys: ``cmd`` (exact match, one of the four commands) and ``file`` (an RE2 regular
expression, Go's syntax as in Cilium, searched in the file name; only with ``READ``/``WRITE`` or
no ``cmd``: ``HALT`` and ``RESET`` take no file, so proxylib rejects the combination and so does
proxyd). Example::

    rules:
      l7proto: r2d2
      l7:
        - cmd: READ
          file: "^/public/"
        - cmd: HALT
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.errors import RuleError
from proxyd.ops import DROP, ERROR, ERROR_INVALID_FRAME_TYPE, INJECT, MORE, NOP_VERDICT, PASS, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, Parser, ParserFactory, RuleMatcher
from proxyd.policy.regex import RuleRegex, compile_rule_regex

COMMANDS = frozenset({"READ", "WRITE", "HALT", "RESET"})
_NEEDS_FILE = frozenset({"READ", "WRITE"})
DENIED_REPLY = b"ERROR\r\n"
#: A request line longer than this is a protocol error rather than an ever-growing buffer.
MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class R2d2Request:
    cmd: str
    file: str


@dataclass(frozen=True, slots=True)
class R2d2Rule:
    cmd: str | None
    file: RuleRegex | None

    def matches(self, request: Any) -> bool:
        if not isinstance(request, R2d2Request):
            return False
        if self.cmd is not None and self.cmd != request.cmd:
            return False
        return self.file is None or self.file.search(request.file)


#: Bound on requests awaiting a reply; beyond it the client is not following the protocol.
MAX_PENDING = 10000


class R2d2Parser(Parser):
    __slots__ = ("ctx", "inject_pending", "pending")

    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx
        # One entry per request awaiting its reply line, in order: True for a forwarded
        # request (the server answers it), False for a denied one (we answer it).
        self.pending: deque[bool] = deque()
        self.inject_pending = 0  # bytes queued toward the client, to INJECT at the next call

    def _deny_slots(self) -> int:
        """Queue ERROR for the denied requests now at the head; returns the bytes queued."""
        n = 0
        while self.pending and not self.pending[0]:
            self.pending.popleft()
            n += 1
        if n:
            self.ctx.inject(True, DENIED_REPLY * n)
        return n * len(DENIED_REPLY)

    def _on_reply(self, end_stream: bool, data: Data) -> Verdict:
        if self.inject_pending:
            n, self.inject_pending = self.inject_pending, 0
            return INJECT, n
        if not data:
            return NOP_VERDICT
        end = data.find(b"\r\n")
        if end < 0:
            # Mid-line: pass what we have, keeping a trailing CR that may start the CRLF.
            keep = 1 if data[-1] == 0x0D and not end_stream else 0
            return (PASS, len(data) - keep) if len(data) > keep else (MORE, 1)
        if self.pending:
            self.pending.popleft()
            # ERRORs for the denied requests right after this one go out once this line is
            # through: by INJECT at the next call if more reply bytes are buffered (the round
            # goes on), else the engine sends them at the end of this round.
            queued = self._deny_slots()
            if len(data) > end + 2:
                self.inject_pending = queued  # we are called again: INJECT right after this line
        return PASS, end + 2

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if reply:
            return self._on_reply(end_stream, data)
        # Search only the first MAX_LINE bytes: a line is too long however the bytes arrived.
        end = data.find(b"\r\n", 0, MAX_LINE)
        if end < 0:
            if len(data) >= MAX_LINE:
                return ERROR, ERROR_INVALID_FRAME_TYPE
            return MORE, 1
        line = bytes(data[:end]).decode("latin-1")
        parts = line.split(" ")
        cmd = parts[0]
        if cmd not in COMMANDS:
            self.ctx.log(EntryType.DENIED, {"cmd": cmd, "error": "unknown command"})
            return ERROR, ERROR_INVALID_FRAME_TYPE
        file = parts[1] if len(parts) > 1 else ""
        if (cmd in _NEEDS_FILE) != (len(parts) == 2):
            return ERROR, ERROR_INVALID_FRAME_TYPE
        request = R2d2Request(cmd, file)
        fields = {"cmd": cmd, "file": file}
        if len(self.pending) >= MAX_PENDING:
            return ERROR, ERROR_INVALID_FRAME_TYPE
        if self.ctx.matches(request):
            self.ctx.log(EntryType.REQUEST, fields)
            self.pending.append(True)
            return PASS, end + 2
        self.ctx.log(EntryType.DENIED, fields)
        if any(self.pending):
            self.pending.append(False)  # answered in its place, after the earlier replies
        else:
            self.pending.clear()
            self.ctx.inject(True, DENIED_REPLY)  # nothing outstanding: answer at once
        return DROP, end + 2


class R2d2Factory(ParserFactory):
    name = "r2d2"
    rule_keys = ("cmd", "file")
    description = "CRLF line protocol of the Cilium proxylib tutorial"

    def compile_rule(self, rule: Mapping[str, Any]) -> RuleMatcher:
        cmd: str | None = None
        file: RuleRegex | None = None
        for key, value in rule.items():
            if key == "cmd":
                if not isinstance(value, str) or value not in COMMANDS:
                    raise RuleError(f"must be one of {', '.join(sorted(COMMANDS))}, not {value!r}", key)
                cmd = value
            elif key == "file":
                # "" is no constraint, as in proxylib (and an empty regex matches every name).
                file = compile_rule_regex(value, key) if value != "" else None
            else:
                raise RuleError("unknown rule key for l7proto 'r2d2' (known: cmd, file)", key)
        if file is not None and cmd is not None and cmd not in _NEEDS_FILE:
            # proxylib's r2d2 parser: "cmd not compatible with file"
            raise RuleError(f"cmd {cmd} takes no file, so a file constraint cannot apply", "file")
        return R2d2Rule(cmd, file)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return R2d2Parser(ctx)


__all__ = ["INJECT", "R2d2Factory", "R2d2Parser", "R2d2Request", "R2d2Rule"]
