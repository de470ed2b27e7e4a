"""Pieces both memcache dialects share: limits, the pending-reply queue, denial placement.

Theory of operation
-------------------

memcached answers the requests of one connection strictly in order, in both the text and the
binary protocol. The parser therefore keeps one queue of *pending entries*, appended to by the
request side and consumed by the reply side. An entry is a plain tuple
``(kind, match, name, payload)``:

- ``kind`` says how the reply is framed (one reply unit, a ``VALUE ... END`` run, a ``STAT ...
  END`` run, ...) or that the entry is not a request the server sees (``K_DENY``,
  ``K_BARRIER``);
- ``match`` is ``None`` for a request that is always answered, or for a request that may stay
  silent (text ``noreply``, meta ``q``, binary quiet opcodes) the set of replies it can get
  (text: reply codes; binary: the ``(opcode, opaque)`` pair the answer echoes). Such a *maybe*
  entry at the head of the queue that does not accept the reply at hand has been answered with
  silence: it is popped and the next entry is tried;
- ``name`` is the command for the access log; ``payload`` the bytes injected for a denial.

A denied request is dropped, and the client must see the denial exactly where the server's
reply would have been:

1. nothing pending: the denial is injected toward the client at once;
2. the last pending entry is always answered: a ``K_DENY`` entry is queued; when the reply side
   completes the entry before it, the denial is injected right after that reply;
3. the last pending entry is a *maybe* entry: whether (and when) it will be answered is unknown,
   so the parser replaces the denied request with a *barrier*, a harmless request whose reply
   no maybe entry can accept (text ``version``, binary ``NoOp``). The server's answer to the
   barrier tells that every earlier request is done; the parser drops that answer and injects
   the denial in its place.

Injection ordering relies on the engine contract (docs/parser-api.md): bytes queued with
``ctx.inject`` for the direction being parsed are sent at the INJECT op that names them, or at
the end of the round (after the bytes PASS-ed in it, and after a PASS that reaches past the
input). So after a PASS or DROP of ``n`` bytes that completes an entry, queued denials are
named by an INJECT on the next call if the engine will call again in this round (``n`` is less
than the buffered bytes), and left to the end-of-round flush otherwise.

The queue is bounded: at :data:`MAX_PENDING` entries a maybe entry at the head is assumed to
have been answered with silence and dropped; if the head is an always-answered request the
connection is closed with a protocol error (a peer that never reads its replies).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from proxyd.ops import DROP, ERROR, ERROR_PROTOCOL, INJECT, PASS, Verdict
from proxyd.parser import ConnectionContext, EntryType, wire_text

#: Keys longer than this are rejected by memcached (``KEY_MAX_LENGTH``).
MAX_KEY = 250
#: Longest request line (memcached closes a connection with no newline in 2048 bytes).
MAX_LINE = 2048
#: Longest retrieval request line (multi-key ``get``); the bound on buffered request bytes.
MAX_RETRIEVAL_LINE = 65536
#: Longest reply line (``VALUE`` lines are < 300 bytes; stats and dump lines are short).
MAX_REPLY_LINE = 8192
#: Pending replies per connection before the peer counts as broken.
MAX_PENDING = 10000
#: The most bytes the parser ever holds unconsumed in one direction (before erroring).
MAX_BUFFERED = MAX_RETRIEVAL_LINE

# Entry kinds: how the reply to a pending entry is framed.
K_UNIT = 0  # exactly one reply unit (a line, or a VALUE/VA line with its data block)
K_RETR = 1  # VALUE units until END (text get/gets/gat/gats)
K_STATS = 2  # STAT/ITEM/PREFIX lines until END; binary: responses until an empty one
K_DUMP = 3  # lru_crawler metadump/mgdump: key=/mg lines until END/EN
K_WATCH = 4  # watch: OK, then an endless log stream
K_DENY = 5  # a dropped request: inject ``payload`` once the entries before it are answered
K_BARRIER = 6  # our own barrier request: drop its reply, inject ``payload``

Entry = tuple[int, Any, str, bytes]


class PendingQueue:
    """The pending-reply queue of one connection and the denial placement rules above."""

    __slots__ = ("barrier", "ctx", "q", "rep_owed", "req_owed")

    def __init__(self, ctx: ConnectionContext, barrier: bytes) -> None:
        self.ctx = ctx
        self.q: deque[Entry] = deque()
        self.barrier = barrier  # request bytes whose reply no maybe entry accepts
        self.req_owed = 0  # bytes injected toward the server still to name with INJECT
        self.rep_owed = 0  # bytes injected toward the client still to name with INJECT

    def push(self, entry: Entry) -> bool:
        """Queue an entry; False when the queue is full of always-answered requests."""
        q = self.q
        while len(q) >= MAX_PENDING:
            if q[0][1] is None:
                return False
            q.popleft()  # a maybe entry this old was answered with silence
        q.append(entry)
        return True

    def deny(self, name: str, payload: bytes, n: int, have: int) -> Verdict | None:
        """Place a denial for a request being dropped; returns the request side's DROP.

        ``n`` is the size of the dropped request, ``have`` the bytes buffered. Returns None
        when the pending queue is full (a protocol error for the caller).
        """
        q = self.q
        if not q:
            self.ctx.inject(True, payload)
        elif q[-1][1] is None:
            if not self.push((K_DENY, None, name, payload)):
                return None
        else:
            if not self.push((K_BARRIER, None, name, payload)):
                return None
            barrier = self.barrier
            self.ctx.inject(False, barrier)
            if n < have:
                self.req_owed = len(barrier)
        return (DROP, n)

    def complete(self, n: int, have: int, status: bytes | str, log: bool) -> Verdict:
        """The head entry's reply ends with the next ``n`` bytes: pass them.

        Pops the entry, logs the response, then injects the denials queued right behind it.
        A barrier's reply is dropped instead, and its denial injected in its place.
        """
        q = self.q
        kind, _, name, payload = q.popleft()
        owed = 0
        ctx = self.ctx
        drop = kind == K_BARRIER
        if drop:
            ctx.inject(True, payload)
            owed = len(payload)
        elif log:
            ctx.log(EntryType.RESPONSE, lambda: {"command": name, "status": _status(status)})
        while q and q[0][0] == K_DENY:
            payload = q.popleft()[3]
            ctx.inject(True, payload)
            owed += len(payload)
        if owed and n < have:
            self.rep_owed = owed
        return (DROP, n) if drop else (PASS, n)

    def take_owed(self, reply: bool) -> Verdict | None:
        """The INJECT naming bytes queued in this round, if any are owed."""
        if reply:
            n = self.rep_owed
            if n:
                self.rep_owed = 0
                return (INJECT, n)
        else:
            n = self.req_owed
            if n:
                self.req_owed = 0
                return (INJECT, n)
        return None


def key_text(key: bytes) -> str:
    """How wire bytes (a key, an unknown command name) appear in log fields and policy names.

    The native parser (proxyd._native) calls this function too, so both paths log the same.
    It is :func:`proxyd.parser.wire_text`: bytes that are not UTF-8 as ``\\xNN`` and a
    backslash doubled, so the byte 0xff and the text ``\\xff`` never log the same.
    """
    return wire_text(key)


def _status(status: bytes | str) -> str:
    return status[:64].decode("latin-1") if isinstance(status, bytes) else status


def unexpected_reply(ctx: ConnectionContext, status: bytes | str) -> Verdict:
    """A reply arrived with no request pending: log it; a protocol error for the connection."""
    if isinstance(status, bytes):
        status = status[:64].decode("latin-1")
    ctx.log(EntryType.RESPONSE, {"status": status, "error": "reply with no request pending"})
    return (ERROR, ERROR_PROTOCOL)
