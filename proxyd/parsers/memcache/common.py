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

Closing without losing replies
------------------------------

A close the parser decides (a request memcached itself would close on, a full queue) first
delivers every reply already owed: :meth:`PendingQueue.close` stops taking client bytes (they
are dropped), a barrier is sent if the last pending request may stay silent, replies keep
being framed and passed, and once the queue is empty the parser injects its last answer (if
any), logs the reason and returns ERROR. The engine sends what a round passed and injected
before it closes, but it only calls the parser when bytes are buffered, so the parser keeps
the *last byte* of the last owed reply (the reply passes as ``n - 1`` bytes, and the byte is
passed or injected at the next call). It does so whenever a reply that empties the queue
reaches past the buffered bytes, closing or not: a close decided while such a reply is still
streaming then waits for it, and answers queued behind it (``after``) go out after its end.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from proxyd.ops import DROP, ERROR, ERROR_INVALID_FRAME_LENGTH, INJECT, MORE, PASS, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, wire_text

#: Keys longer than this are rejected by memcached (``KEY_MAX_LENGTH``).
MAX_KEY = 250
#: Longest request line (memcached closes a connection with no newline in 2048 bytes, unless
#: the line is a multi-key ``get``: those are bounded only by ``limits.buffer_bytes``).
MAX_LINE = 2048
#: Longest reply line (``VALUE`` lines are < 300 bytes; stats and dump lines are short).
MAX_REPLY_LINE = 8192
#: Pending replies per connection before the peer counts as broken.
MAX_PENDING = 10000
#: The most bytes the parser holds unconsumed in one direction, multi-key ``get`` lines aside
#: (those are held whole, up to the engine's ``buffer_bytes``, as memcached holds them).
MAX_BUFFERED = MAX_REPLY_LINE

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

    __slots__ = ("after", "barrier", "closing", "ctx", "final", "held", "q", "reason", "rep_owed", "req_owed")

    def __init__(self, ctx: ConnectionContext, barrier: bytes) -> None:
        self.ctx = ctx
        self.q: deque[Entry] = deque()
        self.barrier = barrier  # request bytes whose reply no maybe entry accepts
        self.req_owed = 0  # bytes injected toward the server still to name with INJECT
        self.rep_owed = 0  # bytes injected toward the client still to name with INJECT
        self.held = 0  # 1/2: the last byte of the last reply is still to pass/drop (see above)
        self.after = b""  # answers to inject right after that byte
        self.closing = 0  # the error code of a close decided, waiting for owed replies
        self.reason = ""  # why, for the log
        self.final = b""  # the answer to inject at the close

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
            if self.held:
                self.after += payload
            else:
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

    def complete(self, n: int, have: int, status: bytes | str, log: bool, data: Data) -> Verdict:
        """The head entry's reply ends with the next ``n`` bytes: pass them.

        Pops the entry, logs the response, then injects the denials queued right behind it.
        A barrier's reply is dropped instead, and its denial injected in its place. The last
        reply owed keeps its last byte back when it reaches past the input or a close waits
        for it (see the module docstring).
        """
        q = self.q
        kind, _, name, payload = q.popleft()
        ctx = self.ctx
        drop = kind == K_BARRIER
        answers = b""
        if drop:
            answers = payload
        elif log:
            ctx.log(EntryType.RESPONSE, lambda: {"command": name, "status": _status(status)})
        while q and q[0][0] == K_DENY:
            answers += q.popleft()[3]
        if not q and (n > have or self.closing):
            if n > 1:
                self.held = 2 if drop else 1
                self.after = answers
                return (DROP, n - 1) if drop else (PASS, n - 1)
            if self.closing:
                return self.finish((b"" if drop else bytes(data[:1])) + answers)
        if answers:
            ctx.inject(True, answers)
            if n < have:
                self.rep_owed = len(answers)
        return (DROP, n) if drop else (PASS, n)

    def release(self, data: Data) -> Verdict:
        """The held last byte of the last reply is here: pass (or drop) it, then the answers."""
        held = self.held
        self.held = 0
        after = self.after
        self.after = b""
        if self.closing and not self.q:
            return self.finish((bytes(data[:1]) if held == 1 else b"") + after)
        if after:
            self.ctx.inject(True, after)
            if len(data) > 1:
                self.rep_owed = len(after)
        return (PASS, 1) if held == 1 else (DROP, 1)

    def close(self, code: int, reason: str, answer: bytes, have: int) -> Verdict:
        """Close the connection once every reply already owed is delivered (module docstring).

        ``answer`` is injected toward the client at the close, after those replies. Returns
        the verdict for the ``have`` request bytes at hand: ERROR when nothing is owed, else
        DROP (client bytes are no longer taken).
        """
        self.closing = code
        self.reason = reason
        self.final = answer
        q = self.q
        if not q and not self.held:
            return self.finish(b"")
        if q and q[-1][1] is not None:
            # The last request may stay silent: a barrier's answer tells when all are done.
            q.append((K_BARRIER, None, "", b""))
            self.ctx.inject(False, self.barrier)
        return (DROP, have)

    def drain_then_close(self, code: int, reason: str) -> None:
        """Like :meth:`close`, for a request forwarded whose answer the server closes after."""
        self.closing = code
        self.reason = reason

    def closed_request(self, have: int) -> Verdict:
        """Client bytes while a close waits for owed replies: dropped (or the close, if none)."""
        if not self.q and not self.held:
            return self.finish(b"")
        return (DROP, have)

    def finish(self, answer: bytes) -> Verdict:
        """The close: inject what is still owed and the final answer, log why, ERROR."""
        out = answer + self.final
        self.final = b""
        if out:
            self.ctx.inject(True, out)
        self.ctx.log(EntryType.RESPONSE, {"error": self.reason})
        return (ERROR, self.closing)

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


def unsolicited(ctx: ConnectionContext, status: bytes | str, n: int) -> Verdict:
    """A reply with no request pending: forward it (and log it).

    memcached sends ``ERROR Too many open connections`` unasked at its connection limit (then
    closes); a proxy that swallowed it would leave the client guessing.
    """
    if isinstance(status, bytes):
        status = status[:64].decode("latin-1")
    ctx.log(EntryType.RESPONSE, {"status": status, "unsolicited": True})
    return (PASS, n)


def unsolicited_line(ctx: ConnectionContext, data: Data) -> Verdict:
    """A text line the server sent where no text reply can be (no dialect yet, or binary)."""
    end = data.find(b"\n")
    if end < 0:
        if len(data) > MAX_REPLY_LINE:
            return (ERROR, ERROR_INVALID_FRAME_LENGTH)
        return (MORE, 1)
    stop = end - 1 if end > 0 and data[end - 1] == 13 else end
    sp = data.find(b" ", 0, stop)
    return unsolicited(ctx, bytes(data[: sp if sp >= 0 else stop]), end + 1)
