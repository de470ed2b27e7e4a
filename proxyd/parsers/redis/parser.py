"""The ``redis`` parser: command, category and key policy for RESP2, RESP3 and inline commands.

Theory of operation
-------------------

Spec: https://redis.io/docs/latest/develop/reference/protocol-spec/ (RESP2 and RESP3); where it
is silent, redis-server 7's ``src/networking.c`` (see :mod:`.resp`).

Requests. Each request is read (:func:`.resp.parse_request`) only as far as the policy needs:
the name, the subcommand of a container command (``CONFIG GET``), and the arguments the key
specs point at (:func:`.table.key_positions`). Then the request is decided: PASS (allowed) or
DROP (denied) of what was read, reaching past the buffer for an argument whose payload is not
all there, and every later argument is passed or dropped one header at a time, so values are
never held. Arguments before the last key are held until the decision, up to
``max_inspect_bytes`` (64 KiB by default); a command whose keys lie beyond that is judged with
its keys unknown (only a rule without key conditions allows it). Several whole requests that
are allowed go out in one PASS.

Replies. redis-server answers the commands of a connection in order, one reply each, so the
parser keeps a queue of *pending entries*, appended by requests and consumed by replies
(:class:`.resp.ReplyScanner` frames them): a reply for an ordinary command; *n* confirmations
for ``SUBSCRIBE``-family commands (one per channel; for a bare ``UNSUBSCRIBE`` one per
subscription held, at least one, counted from the subscription counts the confirmations carry);
a denial to inject; the reply to proxyd's own ``DISCARD`` to swap for ``EXECABORT``. Frames
that answer no request pass without touching the queue: RESP3 pushes (``message``,
``invalidate`` from ``CLIENT TRACKING``, ...) and, in RESP2 subscribe mode, ``message``,
``pmessage`` and ``smessage`` arrays. RESP2 or RESP3 is learnt from ``HELLO``'s reply (a map is
RESP3) and ``RESET``. ``CLIENT REPLY OFF|SKIP`` suppress replies (denials included) as
redis-server 7 does: not the subscribe-family confirmations (pushes), nor the answer to
``SYNC``/``PSYNC``; a SKIP is used up by the next request the server reads, an empty one
included; a denial that would have used it up is replaced by a ``PING`` to the server.
A command redis-server refuses in RESP2 subscribe mode changes no state here either: the
request side follows the subscriptions the server will hold when it reads each request.
``MONITOR``, ``SYNC`` and ``PSYNC`` turn the reply stream into an unframed one from their
answer on, after any ``\n`` keepalives (a command denied after that closes the connection:
there is no place for it).

Memory. Ordinary commands in a row share one pending entry (a count), so a client may pipeline
without bound, as it can to redis-server; other entries count ``ENTRY_COST`` bytes against
``max_pending_bytes``, and when that is full the request side answers NOP with the client's
bytes buffered: the engine's *hold* stops reading the client until replies drain the queue.

Denials. A denied command is dropped and ``-NOPERM access denied`` is put in its place in the
reply order: at once when nothing is pending and the reply stream is between frames, otherwise
right after the reply of the command before it. Inside ``MULTI`` the same, and the transaction
is marked: its ``EXEC`` is dropped, proxyd sends ``DISCARD`` to the server instead, drops the
server's ``+OK`` and answers ``-EXECABORT Transaction discarded because of previous errors.``,
as Redis does for a command that fails to queue, so nothing of the transaction runs.

Always allowed (still logged): ``AUTH HELLO PING QUIT RESET SELECT ECHO CLIENT SETNAME MULTI
EXEC DISCARD UNWATCH``. Access log: ``command`` (``get``, ``config|get``), ``keys`` (at most 8,
escaped; never arguments, so ``AUTH``/``HELLO`` passwords never reach the log) and ``db`` (from
``SELECT``, back to 0 on ``RESET``).

Bad requests are answered as redis-server answers them (``-ERR Protocol error: invalid bulk
length``, ...), in reply order, and the connection is then closed with the reason logged; a
reply that is not RESP closes the connection too, after the replies owed before it. Memory
stays bounded whatever lengths claim: a request holds at most ``max_inspect_bytes`` plus one
64 KiB length line, a reply at most one 64-byte line (longer simple strings and errors are
streamed) and its reader's stack of differently shaped aggregates, and the engine's
``limits.buffer_bytes`` caps the buffers.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

from proxyd.ops import DROP, ERROR, ERROR_PROTOCOL, INJECT, MORE, NOP_VERDICT, PASS, Op, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, Parser

from .resp import (
    ARRAY,
    BAD,
    ERRORS,
    MAP,
    PARTIAL,
    PROTO_MAX_BULK_LEN,
    PUSH,
    Head,
    ReplyScanner,
    RequestError,
    parse_request,
    read_bulk_header,
    string2ll,
)
from .rules import RedisRequest
from .table import Command, NeedArg, key_positions, lookup

NOPERM = b"-NOPERM access denied\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
DISCARD = b"*1\r\n$7\r\nDISCARD\r\n"
#: Sent in place of a denied command while the server's CLIENT REPLY SKIP is armed (see _commit).
PING = b"*1\r\n$4\r\nPING\r\n"

#: Commands every policy allows (the commands inside a transaction are judged one by one).
ALWAYS_ALLOWED = frozenset(
    {"auth", "hello", "ping", "quit", "reset", "select", "echo", "client|setname", "multi", "exec",
     "discard", "unwatch"}
)  # fmt: skip
#: Subscribe-family commands: one confirmation per channel argument.
PUBSUB = frozenset({"subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "sunsubscribe"})
_OOB_MESSAGES = frozenset({b"message", b"pmessage", b"smessage"})
_RAW_AFTER = frozenset({"monitor", "sync", "psync"})
#: Replication handshakes: their answer is written straight to the socket by redis-server
#: (``connWrite`` in ``src/replication.c``), so CLIENT REPLY OFF/SKIP do not silence it.
_REPLICATION = frozenset({"sync", "psync"})
#: Subscribe-family commands whose confirmations come even with no channel argument.
_UNSUBSCRIBE = frozenset({"unsubscribe", "punsubscribe", "sunsubscribe"})
MAX_LOGGED_KEYS = 8
MAX_LOGGED_KEY_BYTES = 256
DEFAULT_INSPECT = 64 * 1024
#: Default memory for the replies owed and the reply reader's open aggregates.
DEFAULT_PENDING_BYTES = 1 << 20
#: What one pending entry is counted as (a small list and its deque slot).
ENTRY_COST = 128
#: What one entry of the reply reader's stack is counted as.
STACK_ENTRY_COST = 64

# Pending entry kinds; an entry is a list [kind, name, count, payload, started].
E_REPLY = 0  # ``count`` replies (1 for every command but the subscribe family)
E_SUB = 1  # ``count`` confirmations of ``name``; count 0: one per subscription held, at least one
E_DENY = 2  # no server reply: inject ``payload`` in its place
E_SWAP = 3  # drop one reply (to proxyd's DISCARD), inject ``payload`` instead
E_FATAL = 4  # inject ``payload`` (a protocol error), then close the connection
E_RAW = 5  # one reply, then the reply stream is passed unframed

#: Commands that change what the parser tracks (transactions, db, reply mode, framing).
_STATEFUL = frozenset(
    {"exec", "multi", "discard", "reset", "select", "client|reply", "monitor", "sync", "psync"}
) | PUBSUB
#: Commands whose reply the parser reads for connection state (the general reader only).
_REPLY_STATE = frozenset({"hello", "reset"})
#: What redis-server still runs on a RESP2 connection in subscribe mode.
_SUBSCRIBE_MODE_COMMANDS = PUBSUB | {"ping", "quit", "reset"}
_SUB_FAMILY = {"unsubscribe": 0, "subscribe": 0, "punsubscribe": 1, "psubscribe": 1, "sunsubscribe": 2,
               "ssubscribe": 2}  # fmt: skip


#: Control characters, DEL, the backslash and undecodable bytes (surrogate escapes) as ``\\xNN``.
_ESCAPE = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {92: "\\\\"}
_ESCAPE |= {0xDC00 + b: f"\\x{b:02x}" for b in range(128, 256)}


def _key_text(key: bytes) -> str:
    """A key for the access log: UTF-8 text with everything else escaped, at most 256 bytes."""
    cut = len(key) > MAX_LOGGED_KEY_BYTES
    text = key[:MAX_LOGGED_KEY_BYTES].decode("utf-8", "surrogateescape").translate(_ESCAPE)
    return text + "..." if cut else text


class RedisParser(Parser):
    """Per-connection parser; see the module docstring."""

    __slots__ = (
        "budget",
        "close_next",
        "ctx",
        "db",
        "dead",
        "in_multi",
        "max_bulk",
        "max_entries",
        "max_sub_bytes",
        "multi_dirty",
        "pending",
        "raw",
        "raw_reply",
        "rep_owed",
        "reply_off",
        "req_owed",
        "req_resp3",
        "req_sub_bytes",
        "req_subs",
        "resp3",
        "scanner",
        "skip_next",
        "stream_entry",
        "stream_op",
        "stream_rest",
        "subs",
    )  # fmt: skip

    def __init__(
        self,
        ctx: ConnectionContext,
        budget: int = DEFAULT_INSPECT,
        max_bulk: int = PROTO_MAX_BULK_LEN,
        max_pending: int = DEFAULT_PENDING_BYTES,
    ) -> None:
        self.ctx = ctx
        self.budget = budget
        self.max_bulk = max_bulk
        self.max_entries = max(2, max_pending // ENTRY_COST)
        # request side
        self.stream_rest = 0  # arguments of the decided command still to pass or drop
        self.stream_op = PASS
        self.stream_entry: list[Any] | None = None  # that command's pending entry
        self.in_multi = False
        self.multi_dirty = False  # a command was denied inside this MULTI
        self.reply_off = False  # CLIENT REPLY OFF
        self.skip_next = False  # CLIENT REPLY SKIP
        self.db = 0
        self.dead = False  # a protocol error was found: drop the rest of the client's bytes
        self.raw = False  # MONITOR/SYNC/PSYNC sent
        self.req_owed = 0
        # What redis-server knows when it reads the next request (not yet from its replies):
        # the protocol HELLO asked for, and the subscriptions held, so that a command it refuses
        # in RESP2 subscribe mode changes nothing here either. None: too many names to track.
        self.req_resp3 = False
        self.req_subs: list[set[bytes]] | None = [set(), set(), set()]
        self.req_sub_bytes = 0
        self.max_sub_bytes = max_pending
        # reply side
        self.pending: deque[list[Any]] = deque()
        self.scanner = ReplyScanner(max(64, max_pending // STACK_ENTRY_COST))
        self.resp3 = False
        self.subs = [0, 0, 0]  # channels, patterns, shard channels held (from confirmations)
        self.raw_reply = False
        self.rep_owed = 0
        self.close_next = False  # a protocol error was injected behind a passing reply

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if reply:
            return self._on_reply(data)
        return self._on_request(data)

    # --- requests -------------------------------------------------------------------------

    def _on_request(self, data: Data) -> Verdict:
        if self.req_owed:
            n, self.req_owed = self.req_owed, 0
            return (INJECT, n)
        if not data:
            return NOP_VERDICT
        if self.dead:
            return (ERROR, ERROR_PROTOCOL) if self.close_next else (DROP, len(data))
        if self.stream_rest:
            return self._stream(data)
        return self._requests(data, 0)

    def _requests(self, data: Data, base: int) -> Verdict:
        """Decide the requests from ``data[base]`` on (the ones before it went out in this
        verdict's PASS): the loop of :meth:`_on_request`, where the native twin hands over."""
        n = len(data)
        pending = self.pending
        limit = self.max_entries
        while base < n:
            if len(pending) >= limit:
                # Hold: no more requests until replies drain the queue (the engine stops
                # reading the client and calls again once the server's replies progress).
                # An ordinary command may still join the last entry, so at most one entry
                # more than the limit is ever queued.
                last = pending[-1]
                if len(pending) > limit or last[0] != E_REPLY or last[1] in _REPLY_STATE:
                    return (PASS, base) if base else NOP_VERDICT
            try:
                head = parse_request(data, base, self.budget, self.max_bulk)
            except RequestError as exc:
                if base:
                    return (PASS, base)
                return self._protocol_error(str(exc), n)
            if head is None:
                return (PASS, base) if base else (MORE, 1)
            if head.argc == 0:  # an empty request: redis-server answers nothing, but resets the
                self.skip_next = False  # client, which ends a CLIENT REPLY SKIP (resetClient)
                base = head.end
                continue
            judged = self._judge(head)
            if isinstance(judged, int):
                return (PASS, base) if base else (MORE, judged)
            allowed, name, cmd, keys = judged
            simple = allowed and head.complete and not (name == "exec" and self.multi_dirty)
            if not simple and base:
                return (PASS, base)  # the next call decides this command again, from the head
            op = self._commit(head, allowed, name, cmd, keys, n)
            if op is not None:
                return op
            base = head.end
        return (PASS, base)

    def _judge(self, head: Head) -> int | tuple[bool, str, Command | None, list[bytes] | None]:
        """Decide one request: ``(allowed, name, table entry, keys)`` or bytes still needed."""
        args = head.args
        got = len(args)
        if not got:
            if head.need:
                return head.need
            name, cmd = "", None  # a name longer than the inspection budget
        else:
            sub: bytes | None = None
            if head.argc > 1:
                if got > 1:
                    sub = args[1]
                elif head.need:
                    probe = lookup(args[0], None)[1]
                    if probe is not None and probe.subcommands:
                        return head.need
            name, cmd = lookup(args[0], sub)
        if name in ALWAYS_ALLOWED:
            return True, name, cmd, []
        keys: list[bytes] | None = None
        simple = cmd.simple if cmd is not None else None
        if simple is not None:  # one index/range spec (key_positions' fast path, inline)
            first, lastkey, step = simple
            argc = head.argc
            last = first + lastkey if lastkey >= 0 else argc + lastkey
            if last >= argc or last < first or first >= argc:
                keys = None  # does not fit the spec: the server refuses it
            elif last < got:
                keys = args[first : last + 1 : step]
            elif head.need:
                return head.need
        elif cmd is not None:

            def get(i: int) -> bytes:
                if i < got:
                    return args[i]
                raise NeedArg(i)

            try:
                positions = key_positions(cmd, head.argc, get)
                if positions is not None:
                    keys = [get(p) for p in positions]
            except NeedArg:
                if head.need:
                    return head.need
                keys = None  # past the inspection budget
        base, _, _ = name.partition("|")
        categories = cmd.categories if cmd is not None else frozenset()
        known = cmd is not None
        matches = self.ctx.matches
        if not keys:
            allowed = matches(RedisRequest(name, base, categories, known, None))
        else:
            allowed = True
            for k in keys:
                if not matches(RedisRequest(name, base, categories, known, k)):
                    allowed = False
                    break
        return allowed, name, cmd, keys

    def _commit(
        self,
        head: Head,
        allowed: bool,
        name: str,
        cmd: Command | None,
        keys: list[bytes] | None,
        have: int,
    ) -> Verdict | None:
        """Apply a decided request: state, pending entry, log. Returns its op, or None when it
        was allowed and whole (the caller goes on to the next request in the same PASS)."""
        ctx = self.ctx
        db = self.db
        # After MONITOR/SYNC/PSYNC replies are not framed: nothing is queued for them.
        skip = self.skip_next  # redis-server's CLIENT_REPLY_SKIP, for this command only
        raw_before = self.raw
        silent = self.reply_off or skip or raw_before
        self.skip_next = False
        entry: list[Any] | None = None
        if not allowed:
            if self.raw:
                ctx.log(EntryType.DENIED, self._fields(name, keys, db))
                return self._fatal("command denied after MONITOR/SYNC: no place for its answer")
            if self.in_multi:
                self.multi_dirty = True
            if not silent:
                entry = self._push([E_DENY, name, 0, NOPERM, False])
                self._flush_denials()
            ctx.log(EntryType.DENIED, self._fields(name, keys, db))
            verdict = self._emit(head, DROP, entry)
            if skip and not self.reply_off:
                # The server's SKIP is armed for the next command it reads, and this one never
                # reaches it: a PING goes in its place, so the skip lands where the client
                # expects it (on nothing the client will read).
                self._to_server(PING, verdict, have)
            return verdict
        op = PASS
        kind, count = E_REPLY, 1
        forced = False  # answered even when replies are off (pushes, replication handshakes)
        # A command redis-server refuses in RESP2 subscribe mode changes nothing.
        stateful = name in _STATEFUL and not self._refused_in_subscribe_mode(name)
        if stateful and name == "exec" and self.multi_dirty:
            self.in_multi = self.multi_dirty = False
            ctx.log(
                EntryType.DENIED,
                {"command": name, "db": db, "error": "transaction aborted: a command in it was denied"},
            )
            if not silent:  # else its +OK is not sent either
                self._push([E_SWAP, name, 1, EXECABORT, False])
            verdict = self._emit(head, DROP, None)
            self._to_server(DISCARD, verdict, have)
            return verdict
        if not stateful:
            pass
        elif name == "multi":
            self.in_multi = True
        elif name in ("exec", "discard"):
            self.in_multi = self.multi_dirty = False
        elif name == "reset":
            # RESET clears CLIENT REPLY OFF before it answers; a SKIP still applies to it.
            self.in_multi = self.multi_dirty = self.reply_off = self.req_resp3 = False
            self.req_subs, self.req_sub_bytes = [set(), set(), set()], 0
            silent = skip or self.raw
            self.db = 0
        elif name == "select" and len(head.args) > 1:
            v = string2ll(head.args[1])
            if v is not None and v >= 0:
                self.db = v
        elif name == "client|reply" and head.argc == 3 and len(head.args) == 3 and not self.in_multi:
            # As clientCommand: OFF and SKIP answer nothing, SKIP is ignored while OFF, and
            # ON clears both before answering +OK.
            mode = head.args[2].lower()
            if mode == b"off":
                self.reply_off = silent = True
            elif mode == b"skip":
                if not self.reply_off:
                    self.skip_next = True
                silent = True
            elif mode == b"on":
                self.reply_off = False
                silent = self.raw
        elif name in PUBSUB and not self.in_multi:
            kind, count = E_SUB, head.argc - 1
            # Confirmations are pushes (CLIENT_PUSHING in src/pubsub.c): sent even under
            # CLIENT REPLY OFF/SKIP. A SUBSCRIBE without a channel is an arity error instead.
            forced = count > 0 or name in _UNSUBSCRIBE
            self._track_subscriptions(name, head)
        elif name in _RAW_AFTER and not self.in_multi:
            kind = E_RAW
            forced = name in _REPLICATION
            self.raw = True
        if (
            name == "hello"
            and len(head.args) > 1
            and head.args[1] in (b"2", b"3")
            and not self.in_multi
            and not self._refused_in_subscribe_mode(name)
        ):
            self.req_resp3 = head.args[1] == b"3"
        if name == "auth" or name == "hello":
            ctx.log(EntryType.REQUEST, {"command": name, "db": db})
        else:
            ctx.log(EntryType.REQUEST, lambda: self._fields(name, keys, db))
        if (not silent or forced) and not raw_before:  # after MONITOR/SYNC nothing is framed
            entry = self._push([kind, name, count, b"", False])
        if head.complete:
            return None
        return self._emit(head, op, entry)

    def _refused_in_subscribe_mode(self, name: str) -> bool:
        """Whether redis-server refuses this command because the connection is in RESP2
        subscribe mode (``processCommand``: only the subscribe family, PING, QUIT and RESET)."""
        if self.req_resp3 or name in _SUBSCRIBE_MODE_COMMANDS:
            return False
        subs = self.req_subs
        if subs is None:  # too many names to track: the counts the replies carried
            return bool(self.subs[0] or self.subs[1] or self.subs[2])
        return bool(subs[0] or subs[1] or subs[2])

    def _track_subscriptions(self, name: str, head: Head) -> None:
        """Follow the subscriptions redis-server will hold after this subscribe-family command."""
        subs = self.req_subs
        if subs is None:
            return
        held = subs[_SUB_FAMILY[name]]
        names = head.args[1:]
        if not head.complete:
            self.req_subs = None  # names past the inspection budget: stop tracking
        elif name in _UNSUBSCRIBE:
            if len(names):
                for n in names:
                    if n in held:
                        held.discard(n)
                        self.req_sub_bytes -= len(n) + 64
            else:
                self.req_sub_bytes -= sum(len(n) + 64 for n in held)
                held.clear()
        else:
            for n in names:
                if n not in held:
                    held.add(n)
                    self.req_sub_bytes += len(n) + 64
            if self.req_sub_bytes > self.max_sub_bytes:
                self.req_subs = None

    @staticmethod
    def _fields(name: str, keys: list[bytes] | None, db: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"command": name, "db": db}
        if keys:
            fields["keys"] = [_key_text(k) for k in keys[:MAX_LOGGED_KEYS]]
            if len(keys) > MAX_LOGGED_KEYS:
                fields["keys_total"] = len(keys)
        return fields

    def _emit(self, head: Head, op: Op, entry: list[Any] | None) -> Verdict:
        """The op for the part of a decided request read so far; the rest is streamed."""
        if head.complete:
            return (op, head.end)
        self.stream_rest = head.rest
        self.stream_op = op
        self.stream_entry = entry
        if not head.rest:
            self.stream_entry = None
        return (op, head.tail or head.end)

    def _stream(self, data: Data) -> Verdict:
        """Pass or drop the remaining arguments of a decided request, header by header."""
        n = len(data)
        pos = 0
        while self.stream_rest and pos < n:
            try:
                end = read_bulk_header(data, pos, self.max_bulk)
            except RequestError as exc:
                if pos:
                    return (self.stream_op, pos)
                return self._protocol_error(str(exc), n)
            if end < 0:
                break
            self.stream_rest -= 1
            pos = end
        if not self.stream_rest:
            self.stream_entry = None
        if pos:
            return (self.stream_op, pos)
        return (MORE, 1)

    def _push(self, entry: list[Any]) -> list[Any]:
        """Queue an entry; returns the one that now stands for it. Ordinary replies in a row
        share one entry (a count), so a pipeline of a million GETs costs one entry: the queue's
        memory (bounded by ``max_pending_bytes``, see _on_request) grows only with entries of
        other kinds."""
        q = self.pending
        if entry[0] == E_REPLY and q and entry[1] not in _REPLY_STATE:
            last = q[-1]
            if last[0] == E_REPLY and last[1] not in _REPLY_STATE:
                last[2] += entry[2]
                return last
        q.append(entry)
        return entry

    def _to_server(self, payload: bytes, verdict: Verdict, have: int) -> None:
        """Queue bytes for the server right after the dropped request ``verdict`` applies to:
        at the next call when more buffered input follows it (INJECT then), else at the end
        of this round."""
        self.ctx.inject(False, payload)
        if verdict[1] < have:
            self.req_owed += len(payload)

    def _flush_denials(self) -> None:
        """Inject the denials at the head of the queue while the reply stream is between frames."""
        q = self.pending
        if not self.scanner.at_boundary:
            return
        while q and q[0][0] == E_DENY:
            self.ctx.inject(True, q.popleft()[3])

    def _protocol_error(self, message: str, have: int) -> Verdict:
        """A request redis-server refuses with a protocol error: answer it so, then close."""
        self.dead = True
        self.stream_rest = 0
        entry = self.stream_entry
        if entry is not None:  # a command cut short: the server will never answer it
            if entry[2] > 1 and entry[0] == E_REPLY:
                entry[2] -= 1
            else:
                with contextlib.suppress(ValueError):
                    self.pending.remove(entry)
            self.stream_entry = None
        # Under CLIENT REPLY OFF/SKIP redis-server writes no error either; it still closes.
        silent = self.reply_off or self.skip_next
        payload = b"" if silent else b"-ERR " + message.encode() + b"\r\n"
        self.ctx.log(EntryType.DENIED, {"error": message})
        if not self.pending and self.scanner.at_boundary and not self.raw_reply:
            self.ctx.inject(True, payload)
            return (ERROR, ERROR_PROTOCOL)
        self.pending.append([E_FATAL, message, 0, payload, False])
        return (DROP, have)

    def _fatal(self, reason: str) -> Verdict:
        self.ctx.log(EntryType.DENIED, {"error": reason})
        return (ERROR, ERROR_PROTOCOL)

    # --- replies --------------------------------------------------------------------------

    def _on_reply(self, data: Data) -> Verdict:
        if self.rep_owed:
            n, self.rep_owed = self.rep_owed, 0
            return (INJECT, n)
        if self.close_next:
            return (ERROR, ERROR_PROTOCOL)
        n = len(data)
        if not n:
            return NOP_VERDICT
        if self.raw_reply:
            return (PASS, n)
        sc = self.scanner
        q = self.pending
        pos = 0
        # Fast path: simple and bulk string replies to ordinary commands, between frames
        # (what the general reader below would do for them, without its bookkeeping).
        while pos < n and q and sc.fresh and not sc.stack:
            entry = q[0]
            if entry[0] != E_REPLY or entry[1] in _REPLY_STATE:
                break
            t = data[pos]
            if t == 43 or t == 45:  # '+' '-'
                eol = data.find(b"\r\n", pos + 1)
                if eol < 0:
                    break
                end = eol + 2
            elif t == 36:  # '$'
                eol = data.find(b"\r\n", pos + 1, pos + 22)
                if eol < 0:
                    break
                sz = data[pos + 1 : eol]
                if not sz.isdigit() or (sz[0] == 48 and eol != pos + 2):
                    break  # a null, or anything odd: the general reader decides
                end = eol + 4 + int(sz)
                if end > n:
                    break
            else:
                break
            pos = end
            if entry[2] > 1:
                entry[2] -= 1
            else:
                q.popleft()
            if q and q[0][0] >= E_DENY:
                verdict = self._after_frame(data, pos, n, b"")
                if verdict is not None:
                    return verdict
        return self._replies(data, pos)

    def _replies(self, data: Data, pos: int) -> Verdict:
        """The general reply reader from ``data[pos]`` on (the frames before it went out in this
        verdict's PASS): where :meth:`_on_reply`'s fast path, and the native twin, hand over."""
        n = len(data)
        sc = self.scanner
        q = self.pending
        while pos < n:
            start = pos
            if q and q[0][0] == E_RAW and sc.at_boundary:
                # A replication handshake: redis-server sends "\n" keepalives while the save
                # it waits for is pending (replicationCron), before +FULLRESYNC and before the
                # payload's $len; after them the stream is the RDB payload (no CRLF after it,
                # or an EOF mark when diskless) and then the commands the master propagates:
                # passed through unframed. An error (-NOMASTERLINK...) is a reply like any other.
                while pos < n and data[pos] == 10:
                    pos += 1
                if pos == n:
                    return (PASS, n)
                if data[pos] != 45:  # '-'
                    q.popleft()
                    self.raw_reply = True
                    return (PASS, n)
                start = pos
            # The reply to proxyd's DISCARD is dropped: read it whole before passing anything.
            whole = bool(q) and q[0][0] == E_SWAP and sc.at_boundary
            st, pos = sc.scan(data, pos)
            if st == BAD:
                if start:  # the replies before it are owed: they go out first
                    sc.reset()
                    return (PASS, start)
                self.ctx.log(EntryType.RESPONSE, {"error": f"not a RESP reply: {sc.error}"})
                return (ERROR, ERROR_PROTOCOL)
            if st == PARTIAL:
                if whole:
                    sc.reset()
                    if start:
                        return (PASS, start)
                    return (MORE, pos - n if pos > n else sc.need)
                if pos > start:
                    return (PASS, pos)
                return (PASS, start) if start else (MORE, sc.need)
            swapped = b""
            if self._out_of_band():
                self._count_subs()
            elif not q:
                if sc.top not in ERRORS:  # an error may come first ("max number of clients")
                    if start:  # the replies before it are owed: they go out first
                        sc.reset()
                        return (PASS, start)
                    self.ctx.log(EntryType.RESPONSE, {"error": "reply with no request pending"})
                    return (ERROR, ERROR_PROTOCOL)
            elif q[0][0] == E_SWAP:
                if start:
                    sc.reset()
                    return (PASS, start)
                swapped = q.popleft()[3]
            else:
                self._consume(q[0])
            verdict = self._after_frame(data, pos, n, swapped)
            if verdict is not None:
                return verdict
            if self.raw_reply:
                return (PASS, max(pos, n))
        return (PASS, pos)

    def _after_frame(self, data: Data, pos: int, n: int, swapped: bytes) -> Verdict | None:
        """After the frames up to ``pos``: inject what now follows them (denials, a swapped
        reply, a protocol error). Returns the op for ``data[:pos]`` when it is not a plain PASS
        that the caller may extend with the next frame."""
        q = self.pending
        out = [swapped] if swapped else []
        while q and q[0][0] == E_DENY:
            out.append(q.popleft()[3])
        ctx = self.ctx
        if q and q[0][0] == E_FATAL:
            entry = q.popleft()
            ctx.log(EntryType.RESPONSE, {"error": entry[1]})
            out.append(entry[3])
            if pos > n:  # the frame is still being passed through: the error follows it
                ctx.inject(True, b"".join(out))
                self.close_next = True
                return (PASS, pos)
            ctx.inject(True, (b"" if swapped else bytes(data[:pos])) + b"".join(out))
            return (ERROR, ERROR_PROTOCOL)
        if not out:
            return None
        payload = b"".join(out)
        ctx.inject(True, payload)
        if pos < n:
            self.rep_owed = len(payload)
        return (DROP if swapped else PASS, pos)

    def _out_of_band(self) -> bool:
        """Whether the frame just read answers no request (a push, a subscribed message)."""
        sc = self.scanner
        top = sc.top
        if top == PUSH:
            q = self.pending
            first = sc.first
            return not (first is not None and q and q[0][0] == E_SUB and first.lower() == q[0][1].encode())
        if top == ARRAY and not self.resp3 and (self.subs[0] or self.subs[1] or self.subs[2]):
            first = sc.first
            if first is not None:
                low = first.lower()
                if low in _OOB_MESSAGES:
                    return True
                q = self.pending
                if low.decode("latin-1") in PUBSUB and not (
                    q and q[0][0] == E_SUB and low == q[0][1].encode()
                ):
                    return True  # an unsolicited confirmation (a shard channel moved away)
        return False

    def _count_subs(self) -> None:
        sc = self.scanner
        first, third = sc.first, sc.third
        if first is None or third is None:
            return
        fam = _SUB_FAMILY.get(first.lower().decode("latin-1"))
        if fam is None:
            return
        subs = self.subs
        if fam == 2:
            subs[2] = third
        else:
            subs[fam] = max(0, third - subs[1 - fam])

    def _consume(self, entry: list[Any]) -> None:
        """The frame just read answers the head entry."""
        sc = self.scanner
        q = self.pending
        kind = entry[0]
        name = entry[1]
        if kind == E_SUB:
            if not entry[4] and sc.top in ERRORS:
                q.popleft()  # the whole command was refused
                return
            if not entry[4]:
                entry[4] = True
                if entry[2] <= 0:
                    entry[2] = max(1, self.subs[_SUB_FAMILY[name]])
            self._count_subs()
            entry[2] -= 1
            if entry[2] <= 0:
                q.popleft()
            return
        if entry[2] > 1:  # ordinary replies in a row share an entry
            entry[2] -= 1
            return
        q.popleft()
        if kind == E_RAW:
            if sc.top not in ERRORS:
                self.raw_reply = True
            else:
                self.raw = False  # refused (-NOMASTERLINK...): commands are answered again
            return
        if name == "hello":
            if sc.top == MAP:
                self.resp3 = True
            elif sc.top == ARRAY:
                self.resp3 = False
        elif name == "reset" and sc.top == 43:
            self.resp3 = False
            self.subs = [0, 0, 0]


def native_table() -> dict[bytes, tuple[str, str, frozenset[str], int, int, int, int]]:
    """The commands the native twin (``proxyd/_native_src/redis.c``) decides itself, by
    lower-case name: ``(name, base, categories, mode, first, lastkey, step)``.

    ``mode`` 0: always allowed and stateless (``ping``, ``echo``...); 1: its keys are
    ``args[first:last + 1:step]`` (:attr:`.table.Command.simple`); 2: no keys (no key spec, not
    a channel command); 3: ``multi``; 4: ``exec`` and ``discard`` (the twin follows
    ``in_multi``, and hands a transaction with a denied command to this module). Other
    commands that change what the parser tracks, container commands and commands with other
    key specs are not here: the twin hands them to this module.
    """
    from .table import CHANNELS, COMMANDS, CUSTOM_KEYS

    out: dict[bytes, tuple[str, str, frozenset[str], int, int, int, int]] = {}
    for name, cmd in COMMANDS.items():
        if name in ("multi", "exec", "discard"):
            out[name.encode()] = (cmd.name, name, cmd.categories, 3 if name == "multi" else 4, 0, 0, 1)
            continue
        if cmd.subcommands or name in _STATEFUL or name in _REPLY_STATE or name == "auth":
            continue
        if name in ALWAYS_ALLOWED:
            mode, simple = 0, (0, 0, 1)
        elif cmd.simple is not None:
            mode, simple = 1, cmd.simple
        elif not cmd.key_specs and name not in CHANNELS and name not in CUSTOM_KEYS:
            mode, simple = 2, (0, 0, 1)
        else:
            continue
        out[name.encode()] = (cmd.name, name.partition("|")[0], cmd.categories, mode, *simple)
    return out
