"""memcache binary protocol: frame requests and responses, check policy, answer denials.

Theory of operation
-------------------

Spec: https://github.com/memcached/memcached/wiki/BinaryProtocolRevamped (and memcached's
``protocol_binary.h``). Every packet is a 24-byte header and a body::

    0      magic (0x80 request, 0x81 response)   1  opcode        2..3  key length
    4      extras length                          5  data type     6..7  vbucket / status
    8..11  total body length                     12..15 opaque      16..23 CAS
    body:  extras, key, value   (value length = body - extras - key)

A request is PASS-ed as soon as header, extras and key are buffered: the value part is PASS-ed
(or DROP-ped) by the same op, reaching past the input, so values are never buffered.

Requests memcached answers with an error and then closes the connection on: a key over 250
bytes (status 0x0004 ``Invalid arguments``) and extras plus key longer than the body (0x0081).
memcached reads header, extras and key, answers and closes; the parser forwards exactly those
bytes when the policy allows the request (judged by its command and key like any other),
passes the server's answer and closes after it, dropping what the client sends meanwhile. A
denied one is answered with the denial and closed the same way. A bad magic byte (memcached
closes without a word) closes the connection once the replies already owed are delivered.

Policy: the opcode maps to a command name (``GetKQ`` is ``get``, ``IncrementQ`` is ``incr``,
``Stat`` is ``stats``, ...; see :data:`OPCODES`) and the key is the request's key (none for
keyless commands: the ``Stat`` group name is not a key). A denied request is dropped and answered
with a response echoing its opcode and opaque, status 0x0008, body ``access denied``, placed in
order among the replies, for quiet opcodes too (quiet suppresses success, never errors): each
denied request produces exactly one denial.

Replies: responses are framed by their own header. Matching them to requests uses the in-order
rule of :mod:`.common`: an always-answered request takes the next response whatever it is
(``Stat`` takes responses until the empty one that ends the group, or an error); a quiet request
(``GetQ GetKQ SetQ AddQ ReplaceQ DeleteQ IncrementQ DecrementQ FlushQ AppendQ PrependQ GATQ
GATKQ`` and the quiet range commands) is a *maybe* entry that takes a response only when it
echoes its opcode and opaque, since the server answers it only on a hit (gets) or an error
(writes); otherwise it was answered with silence. ``QuitQ`` gets no entry at all. Denials queued
behind a quiet request use a ``NoOp`` barrier (see :mod:`.common`): its response opcode is one no
quiet request echoes, so the denial lands exactly after the earlier requests are done.
"""

from __future__ import annotations

import struct

from proxyd.ops import (
    ERROR,
    ERROR_INVALID_FRAME_LENGTH,
    ERROR_INVALID_FRAME_TYPE,
    ERROR_PROTOCOL,
    MORE,
    NOP_VERDICT,
    PASS,
    Verdict,
)
from proxyd.parser import ConnectionContext, Data, EntryType

from .common import K_STATS, K_UNIT, MAX_KEY, PendingQueue, key_text, unsolicited, unsolicited_line
from .rules import CONTROL_COMMANDS, MemcacheRequest

REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81
HEADER = 24
STATUS_AUTH_ERROR = 0x0008
DENIED_BODY = b"access denied"

# magic, opcode, key length, extras length, data type, vbucket/status, body length, opaque
_HEAD = struct.Struct(">BBHBBHII")
_PACKET = struct.Struct(">BBHBBHIIQ")

_DEFINITE = 0
_QUIET = 1
_SILENT = 2  # QuitQ: never answered

#: opcode -> (name for the log, policy command, quietness, keyed)
OPCODES: dict[int, tuple[str, str, int, bool]] = {
    0x00: ("get", "get", _DEFINITE, True),
    0x01: ("set", "set", _DEFINITE, True),
    0x02: ("add", "add", _DEFINITE, True),
    0x03: ("replace", "replace", _DEFINITE, True),
    0x04: ("delete", "delete", _DEFINITE, True),
    0x05: ("increment", "incr", _DEFINITE, True),
    0x06: ("decrement", "decr", _DEFINITE, True),
    0x07: ("quit", "quit", _DEFINITE, False),
    0x08: ("flush", "flush_all", _DEFINITE, False),
    0x09: ("getq", "get", _QUIET, True),
    0x0A: ("noop", "noop", _DEFINITE, False),
    0x0B: ("version", "version", _DEFINITE, False),
    0x0C: ("getk", "get", _DEFINITE, True),
    0x0D: ("getkq", "get", _QUIET, True),
    0x0E: ("append", "append", _DEFINITE, True),
    0x0F: ("prepend", "prepend", _DEFINITE, True),
    0x10: ("stat", "stats", _DEFINITE, False),
    0x11: ("setq", "set", _QUIET, True),
    0x12: ("addq", "add", _QUIET, True),
    0x13: ("replaceq", "replace", _QUIET, True),
    0x14: ("deleteq", "delete", _QUIET, True),
    0x15: ("incrementq", "incr", _QUIET, True),
    0x16: ("decrementq", "decr", _QUIET, True),
    0x17: ("quitq", "quit", _SILENT, False),
    0x18: ("flushq", "flush_all", _QUIET, False),
    0x19: ("appendq", "append", _QUIET, True),
    0x1A: ("prependq", "prepend", _QUIET, True),
    0x1B: ("verbosity", "verbosity", _DEFINITE, False),
    0x1C: ("touch", "touch", _DEFINITE, True),
    0x1D: ("gat", "gat", _DEFINITE, True),
    0x1E: ("gatq", "gat", _QUIET, True),
    0x20: ("sasl-list-mechs", "sasl-list-mechs", _DEFINITE, False),
    0x21: ("sasl-auth", "sasl-auth", _DEFINITE, False),
    0x22: ("sasl-step", "sasl-step", _DEFINITE, False),
    0x23: ("gatk", "gat", _DEFINITE, True),
    0x24: ("gatkq", "gat", _QUIET, True),
    0x30: ("rget", "rget", _DEFINITE, True),
    0x31: ("rset", "rset", _DEFINITE, True),
    0x32: ("rsetq", "rsetq", _QUIET, True),
    0x33: ("rappend", "rappend", _DEFINITE, True),
    0x34: ("rappendq", "rappendq", _QUIET, True),
    0x35: ("rprepend", "rprepend", _DEFINITE, True),
    0x36: ("rprependq", "rprependq", _QUIET, True),
    0x37: ("rdelete", "rdelete", _DEFINITE, True),
    0x38: ("rdeleteq", "rdeleteq", _QUIET, True),
    0x39: ("rincr", "rincr", _DEFINITE, True),
    0x3A: ("rincrq", "rincrq", _QUIET, True),
    0x3B: ("rdecr", "rdecr", _DEFINITE, True),
    0x3C: ("rdecrq", "rdecrq", _QUIET, True),
    0x3D: ("set-vbucket", "set-vbucket", _DEFINITE, False),
    0x3E: ("get-vbucket", "get-vbucket", _DEFINITE, False),
    0x3F: ("del-vbucket", "del-vbucket", _DEFINITE, False),
    0x40: ("tap-connect", "tap-connect", _DEFINITE, False),
    0x41: ("tap-mutation", "tap-mutation", _DEFINITE, False),
    0x42: ("tap-delete", "tap-delete", _DEFINITE, False),
    0x43: ("tap-flush", "tap-flush", _DEFINITE, False),
    0x44: ("tap-opaque", "tap-opaque", _DEFINITE, False),
    0x45: ("tap-vbucket-set", "tap-vbucket-set", _DEFINITE, False),
    0x46: ("tap-checkpoint-start", "tap-checkpoint-start", _DEFINITE, False),
    0x47: ("tap-checkpoint-end", "tap-checkpoint-end", _DEFINITE, False),
}

#: The opcodes memcached 1.6 implements. For any other it reads header, extras and key, answers
#: "unknown command" and skips ``bodylen`` more bytes (``proto_bin.c``, ``dispatch_bin_command``):
#: ``extras + key`` bytes past the packet. The parser frames such a request as memcached reads it,
#: so what follows is judged as the request memcached will see.
MEMCACHED_OPCODES = frozenset([*range(0x00, 0x1B), 0x1C, 0x1D, 0x1E, 0x20, 0x21, 0x22, 0x23, 0x24])

#: Response status names for the access log.
STATUS_NAMES = {
    0x00: "ok",
    0x01: "key_not_found",
    0x02: "key_exists",
    0x03: "value_too_large",
    0x04: "invalid_arguments",
    0x05: "item_not_stored",
    0x06: "non_numeric_value",
    0x07: "vbucket_elsewhere",
    0x08: "auth_error",
    0x09: "auth_continue",
    0x20: "auth_error",
    0x21: "auth_continue",
    0x81: "unknown_command",
    0x82: "out_of_memory",
    0x83: "not_supported",
    0x84: "internal_error",
    0x85: "busy",
    0x86: "temporary_failure",
}

#: The barrier request: a NoOp (see :mod:`.common`).
BARRIER_REQUEST = _PACKET.pack(REQUEST_MAGIC, 0x0A, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0)


def denied_response(opcode: int, opaque: int) -> bytes:
    """The answer to a denied request: its opcode and opaque, status 0x0008, ``access denied``."""
    return (
        _PACKET.pack(RESPONSE_MAGIC, opcode, 0, 0, 0, STATUS_AUTH_ERROR, len(DENIED_BODY), opaque, 0)
        + DENIED_BODY
    )


class BinaryProtocol:
    """The binary dialect of one connection (both directions)."""

    __slots__ = ("ctx", "log_responses", "pending")

    def __init__(self, ctx: ConnectionContext, log_responses: bool) -> None:
        self.ctx = ctx
        self.pending = PendingQueue(ctx, BARRIER_REQUEST)
        self.log_responses = log_responses

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if not data:
            return NOP_VERDICT
        if reply:
            return self._reply(data)
        return self._request(data)

    def _request(self, data: Data) -> Verdict:
        pending = self.pending
        if pending.req_owed:
            return pending.take_owed(False)  # type: ignore[return-value]
        have = len(data)
        if pending.closing:
            return pending.closed_request(have)
        if have < HEADER:
            return MORE, HEADER - have
        magic, opcode, keylen, extlen, _, _, bodylen, opaque = _HEAD.unpack_from(data)
        if magic != REQUEST_MAGIC:
            return pending.close(ERROR_INVALID_FRAME_TYPE, f"binary request magic 0x{magic:02x}", b"", have)
        head = HEADER + extlen + keylen
        if have < head:
            return MORE, head - have
        key = bytes(data[HEADER + extlen : head])
        info = OPCODES.get(opcode)
        if info is None:
            opname = command = f"0x{opcode:02x}"
            quiet, keyed = _DEFINITE, bool(key)
        else:
            opname, command, quiet, keyed = info
        # memcached answers these two with an error after reading header, extras and key, then
        # closes the connection.
        bad = ""
        if keylen + extlen > bodylen:
            bad = "binary request extras and key longer than its body"
        elif keylen > MAX_KEY:
            bad = "binary request key over 250 bytes"
        n = head if bad else HEADER + bodylen
        if opcode not in MEMCACHED_OPCODES and not bad:
            # memcached answers "unknown command" and then skips ``bodylen`` more bytes after the
            # extras and key it has read: the request is that long on its side.
            n += extlen + keylen
        ctx = self.ctx
        if command in CONTROL_COMMANDS or ctx.matches(MemcacheRequest(command, (key,) if keyed else ())):
            # Fields built lazily: most deployments log denials only (access_log.requests).
            ctx.log(
                EntryType.REQUEST, lambda: {"opcode": opname, "key": key_text(key)}
            )
            if quiet != _SILENT or bad:
                entry = (
                    K_STATS if opcode == 0x10 and not bad else K_UNIT,
                    (opcode, opaque) if quiet == _QUIET and not bad else None,
                    opname,
                    b"",
                )
                if not pending.push(entry):
                    return pending.close(ERROR_PROTOCOL, _QUEUE_FULL, b"", have)
            if bad:
                pending.drain_then_close(ERROR_INVALID_FRAME_LENGTH, bad)
            return PASS, n
        ctx.log(EntryType.DENIED, {"opcode": opname, "key": key_text(key)})
        if bad:
            return pending.close(ERROR_INVALID_FRAME_LENGTH, bad, denied_response(opcode, opaque), have)
        verdict = pending.deny(opname, denied_response(opcode, opaque), n, have)
        return verdict if verdict is not None else pending.close(ERROR_PROTOCOL, _QUEUE_FULL, b"", have)

    def _reply(self, data: Data) -> Verdict:
        pending = self.pending
        if pending.rep_owed:
            return pending.take_owed(True)  # type: ignore[return-value]
        if pending.held:
            return pending.release(data)
        if data[0] != RESPONSE_MAGIC:
            # Not a response: a text line such as memcached's "ERROR Too many open connections".
            return unsolicited_line(self.ctx, data)
        have = len(data)
        if have < HEADER:
            return MORE, HEADER - have
        _, opcode, keylen, extlen, _, status, bodylen, opaque = _HEAD.unpack_from(data)
        if keylen + extlen > bodylen:
            return ERROR, ERROR_INVALID_FRAME_LENGTH
        n = HEADER + bodylen
        q = pending.q
        while True:
            if not q:
                return unsolicited(self.ctx, STATUS_NAMES.get(status) or f"0x{status:04x}", n)
            head = q[0]
            match = head[1]
            if match is None or (match[0] == opcode and match[1] == opaque):
                break
            q.popleft()  # a quiet request that was answered with silence
        if head[0] == K_STATS and status == 0 and bodylen:
            return PASS, n  # one stat; the group ends with an empty response
        return pending.complete(
            n, have, STATUS_NAMES.get(status) or f"0x{status:04x}", self.log_responses, data
        )


_QUEUE_FULL = "more than 10000 replies pending"
