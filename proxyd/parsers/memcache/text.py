"""memcache text and meta protocol: request framing, policy checks and reply framing.

Theory of operation
-------------------

Spec: memcached ``doc/protocol.txt`` (https://github.com/memcached/memcached/blob/master/doc/
protocol.txt); where it is vague, memcached 1.6's ``proto_text.c`` is the reference, since a
proxy that frames a request differently from the server lets a client smuggle commands past the
policy.

Requests are lines ending in ``\\n`` (a ``\\r`` before it is stripped, as memcached does; a NUL
ends the command, as memcached reads C strings), split on single spaces (empty tokens
skipped). Storage commands (``set add replace append prepend cas``) and ``ms`` are followed by a
data block of the size given in the line plus ``\\r\\n``: the parser PASSes (or DROPs) line and
block in one op that may reach past the buffered bytes, so values are never buffered.

Whether memcached reads that data block depends on the line: with a wrong token count, a key
over 250 bytes, or a flags, exptime, size or cas token its ``safe_strto*`` functions reject
(``set k 0 blah 1``, ``set k 0 0 -1``), it answers an error and parses the block as commands.
The parser mirrors that exactly (the line alone is the request, the block is read as
requests): numbers are read as memcached reads them, C ``strtol`` included (leading
whitespace and a sign accepted, anything but whitespace after the digits rejected, range
errors rejected, and the size truncated to 32 bits as ``safe_strtol`` stores it, so
``4294967295`` is ``-1`` and rejected, ``4294967296`` is ``0``). Such a line is judged by its
command and key like any other request: forwarded when allowed (memcached answers
``CLIENT_ERROR bad command line format``), dropped and answered ``CLIENT_ERROR access
denied`` when denied.

Each request gets a pending entry (see :mod:`.common`) saying how its reply is framed:

=================================  ==============================================================
``get gets bget gat gats``         ``VALUE <key> <flags> <bytes> [<cas>]`` + data, ..., ``END``
``stats``                          ``STAT``/``ITEM``/``PREFIX`` lines, ``END``; or one line
``lru_crawler metadump|mgdump``    ``key=...``/``mg ...`` lines, ``END``/``EN``; or one line
``watch``                          ``OK``, then log lines for ever (passed without framing)
``quit``                           nothing (the server closes)
anything else, meta commands       one unit: a line (``STORED``, ``HD``, a number, ``MN``...)
                                   or ``VA <size> <flags>*`` + data
=================================  ==============================================================

An error line (``ERROR``, ``CLIENT_ERROR ...``, ``SERVER_ERROR ...``) ends any of them.

``noreply`` (read as memcached's ``set_noreply_maybe`` does: the last token, on commands whose
token count is valid) means no reply at all: memcached 1.6 suppresses every reply of such a
request, errors included, so it gets no pending entry. (An older server that still sends an
error for a ``noreply`` request would see that error taken as the next request's reply.)

The meta ``q`` flag makes the entry a *maybe* entry that accepts only the replies quiet mode
does not hide: ``VA HD`` for ``mg``, ``NS EX NF`` for ``ms``, ``NF EX`` for ``md``, ``NF NS EX``
for ``ma``, plus ``SERVER_ERROR`` (and ``CLIENT_ERROR`` for ``ms``, whose data block may be
bad, and ``ma``, whose value may not be numeric). A quiet line that memcached rejects (unknown
or repeated flag, bad numeric token, key over 250 bytes, opaque over 32, bad base64 key, too many
tokens) is always answered with an error, so it is an ordinary entry. The one ambiguity left: a
``CLIENT_ERROR`` right after an ``ms q``/``ma q`` that succeeded silently is taken as that
request's reply, shifting the matching of later replies by one (every byte still reaches the
client in order, the last reply as an unsolicited one; what is off is the access log's
matching, and a denial queued behind lands one reply late). The same holds for any reply a
quiet request accepts that in fact belongs to the next request (``md k q`` that deleted ``k``,
then ``md k``: ``NF``). A quiet request with an opaque (``O`` flag, which memcached echoes,
and which clients pipelining quiet commands use to match replies) accepts only a reply
carrying that opaque, which removes the ambiguity; clients that pipeline quiet meta commands
should send one.

Unknown commands are decided by the policy like any command (their name is the first token, so
only a rule that allows every command allows them), forwarded, and memcached answers ``ERROR``.

Policy: a request's keys (every key of a multi-key get, each checked on its own; the decoded
key of a meta command with the ``b`` flag) and its command name (see :mod:`.rules`). A denied
request is dropped with its data block and answered ``CLIENT_ERROR access denied`` in its place
in the reply stream; a denied ``noreply`` request gets nothing, a denied meta ``q`` request
still gets the error (quiet mode never hides errors).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from proxyd.ops import (
    DROP,
    ERROR,
    ERROR_INVALID_FRAME_LENGTH,
    ERROR_PROTOCOL,
    MORE,
    NOP_VERDICT,
    PASS,
    Verdict,
)
from proxyd.parser import ConnectionContext, Data, EntryType

from .common import (
    K_DUMP,
    K_RETR,
    K_STATS,
    K_UNIT,
    K_WATCH,
    MAX_KEY,
    MAX_LINE,
    MAX_REPLY_LINE,
    PendingQueue,
    key_text,
    unsolicited,
)
from .rules import CONTROL_COMMANDS, MemcacheRequest

DENIED_REPLY = b"CLIENT_ERROR access denied\r\n"
#: The barrier request (see :mod:`.common`): every memcached answers it with one ``VERSION``
#: line, a reply no quiet or noreply request can get.
BARRIER_REQUEST = b"version\r\n"

# Command families.
_F_GET = 0  # get gets bget: keys from token 1
_F_GAT = 1  # gat gats: exptime, then keys
_F_STORE = 2  # set add replace append prepend: key flags exptime bytes [noreply]
_F_CAS = 3  # cas: key flags exptime bytes cas [noreply]
_F_KEYED = 4  # delete incr decr touch: key ... [noreply]
_F_NOREPLY = 5  # flush_all verbosity cache_memlimit: keyless, [noreply]
_F_ADMIN = 6  # keyless admin commands answering one line (noreply honoured by some)
_F_STATS = 7
_F_CRAWLER = 8
_F_WATCH = 9
_F_QUIT = 10
_F_MG = 11
_F_MS = 12
_F_MD = 13
_F_MA = 14
_F_ME = 15
_F_MN = 16

#: token -> (family, policy command name, min args, max args) for arg-count-checked commands.
_COMMANDS: dict[bytes, tuple[int, str, int, int]] = {
    b"get": (_F_GET, "get", 0, 0),
    b"gets": (_F_GET, "gets", 0, 0),
    b"bget": (_F_GET, "get", 0, 0),
    b"gat": (_F_GAT, "gat", 0, 0),
    b"gats": (_F_GAT, "gats", 0, 0),
    b"set": (_F_STORE, "set", 4, 5),
    b"add": (_F_STORE, "add", 4, 5),
    b"replace": (_F_STORE, "replace", 4, 5),
    b"append": (_F_STORE, "append", 4, 5),
    b"prepend": (_F_STORE, "prepend", 4, 5),
    b"cas": (_F_CAS, "cas", 5, 6),
    b"delete": (_F_KEYED, "delete", 1, 3),
    b"incr": (_F_KEYED, "incr", 2, 3),
    b"decr": (_F_KEYED, "decr", 2, 3),
    b"touch": (_F_KEYED, "touch", 2, 3),
    b"flush_all": (_F_NOREPLY, "flush_all", 0, 2),
    b"verbosity": (_F_NOREPLY, "verbosity", 1, 2),
    b"cache_memlimit": (_F_NOREPLY, "cache_memlimit", 1, 2),
    b"version": (_F_ADMIN, "version", 0, 1 << 30),
    b"shutdown": (_F_ADMIN, "shutdown", 0, 1 << 30),
    b"slabs": (_F_ADMIN, "slabs", 0, 1 << 30),
    b"lru": (_F_ADMIN, "lru", 0, 1 << 30),
    b"misbehave": (_F_ADMIN, "misbehave", 0, 1 << 30),
    b"debugtime": (_F_ADMIN, "debugtime", 0, 1 << 30),
    b"extstore": (_F_ADMIN, "extstore", 0, 1 << 30),
    b"refresh_certs": (_F_ADMIN, "refresh_certs", 0, 1 << 30),
    b"stats": (_F_STATS, "stats", 0, 1 << 30),
    b"lru_crawler": (_F_CRAWLER, "lru_crawler", 0, 1 << 30),
    b"watch": (_F_WATCH, "watch", 0, 1 << 30),
    b"quit": (_F_QUIT, "quit", 0, 1 << 30),
    b"mg": (_F_MG, "mg", 0, 0),
    b"ms": (_F_MS, "ms", 0, 0),
    b"md": (_F_MD, "md", 0, 0),
    b"ma": (_F_MA, "ma", 0, 0),
    b"me": (_F_ME, "me", 0, 0),
    b"mn": (_F_MN, "mn", 0, 0),
}

_ERRORS = frozenset({b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"})
#: Replies a quiet meta request can still get when its line is valid (see the module docstring):
#: the codes quiet mode does not hide, and server errors. ``ms`` can also get ``CLIENT_ERROR bad
#: data chunk`` and ``ma`` ``CLIENT_ERROR`` for a non-numeric value.
_MG_Q_ACCEPT = frozenset({b"VA", b"HD", b"SERVER_ERROR"})
_MS_Q_ACCEPT = frozenset({b"NS", b"EX", b"NF", b"SERVER_ERROR", b"CLIENT_ERROR"})
_MD_Q_ACCEPT = frozenset({b"NF", b"EX", b"SERVER_ERROR"})
_MA_Q_ACCEPT = frozenset({b"NF", b"NS", b"EX", b"SERVER_ERROR", b"CLIENT_ERROR"})
_QUIET_ACCEPT = {_F_MG: _MG_Q_ACCEPT, _F_MS: _MS_Q_ACCEPT, _F_MD: _MD_Q_ACCEPT, _F_MA: _MA_Q_ACCEPT}
#: Meta flags memcached 1.6 knows, by the kind of token they take.
_META_PLAIN = frozenset(b"bklstcfvhuqIPLO")
_META_SIGNED = frozenset(b"NTR")  # safe_strtol token
_META_UNSIGNED = frozenset(b"FCJD")  # safe_strtoul(l) token
#: Admin commands honouring ``noreply`` (memcached's ``set_noreply_maybe``).
_ADMIN_NOREPLY = frozenset({"lru", "extstore", "refresh_certs"})

_STATS_MORE = frozenset({b"STAT", b"ITEM", b"PREFIX"})
_RETRIEVAL_PREFIXES = (b"get ", b"gets ", b"gat ", b"gats ", b"bget ")
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_NO_KEYS: tuple[bytes, ...] = ()
_K_NONE = -1  # the request is never answered: no pending entry
_QUEUE_FULL = "more than 10000 replies pending"
_TOO_LONG = "request line over 2048 bytes that is not a multi-key get"


def _is_retrieval(data: Data) -> bool:
    """Whether a buffered line without newline is a (possibly long) multi-key retrieval."""
    head = bytes(data[:200]).lstrip(b" ")
    return head.startswith(_RETRIEVAL_PREFIXES)


def _digits(tok: bytes, most: int) -> bool:
    """1..most plain ASCII digits."""
    return 0 < len(tok) <= most and tok.isdigit()


_C_SPACE = b" \t\n\v\f\r"  # C isspace() in the C locale
_INT_MAX = (1 << 31) - 1
_ULONG_MAX = (1 << 64) - 1


def _strto(tok: bytes) -> tuple[int, bool] | None:
    """C ``strtol``/``strtoull`` of a whole token as memcached's ``safe_strto*`` check it.

    Returns (magnitude, negative), or None when memcached rejects the token: no digits, a
    character after them that is not whitespace, or a magnitude past 64 bits (ERANGE). Used
    only on request lines (at most 2048 bytes, multi-key gets aside).
    """
    i = 0
    k = len(tok)
    while i < k and tok[i] in _C_SPACE:
        i += 1
    neg = False
    if i < k and tok[i] in b"+-":
        neg = tok[i] == 45
        i += 1
    j = i
    while j < k and 48 <= tok[j] <= 57:
        j += 1
    if j == i or (j < k and tok[j] not in _C_SPACE):
        return None
    digits = tok[i:j].lstrip(b"0")
    if len(digits) > 20:
        return None
    mag = int(digits) if digits else 0
    if mag > _ULONG_MAX:
        return None
    return mag, neg


def _strtol32(tok: bytes) -> int | None:
    """memcached's ``safe_strtol``: C ``strtol`` (64-bit long), stored into an int32_t."""
    r = _strto(tok)
    if r is None:
        return None
    v = -r[0] if r[1] else r[0]
    if v > (1 << 63) - 1 or v < -(1 << 63):
        return None
    return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _strtoul_ok(tok: bytes) -> bool:
    """memcached's ``safe_strtoul``/``safe_strtoull`` accept the token (64-bit unsigned long)."""
    r = _strto(tok)
    if r is None:
        return False
    v = (-r[0]) & _ULONG_MAX if r[1] else r[0]
    return not (v >= 1 << 63 and b"-" in tok)


def _size(tok: bytes) -> int:
    """A data block size as memcached reads it, or -1 when it answers an error instead."""
    v = _strtol32(tok)
    return -1 if v is None or v < 0 or v > _INT_MAX - 2 else v


def _decode_b64_key(key: bytes) -> bytes | None:
    """The decoded meta key, or None unless it is canonical base64 (see :mod:`.rules`)."""
    if not key or len(key) % 4 or _BASE64.fullmatch(key) is None:
        return None
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None


def _echoes(data: Data, stop: int, opaque: bytes) -> bool:
    """Whether the reply line ``data[:stop]`` carries the opaque flag token `` O...``."""
    at = data.find(opaque, 0, stop)
    while at >= 0:
        end = at + len(opaque)
        if end == stop or data[end] == 32:
            return True
        at = data.find(opaque, end, stop)
    return False


def _log_keys(keys: tuple[bytes, ...]) -> list[str]:
    return [key_text(k) for k in keys]


class TextProtocol:
    """The text/meta dialect of one connection (both directions)."""

    __slots__ = ("_rscan", "_scan", "_stream", "ctx", "log_responses", "pending")

    def __init__(self, ctx: ConnectionContext, log_responses: bool) -> None:
        self.ctx = ctx
        self.pending = PendingQueue(ctx, BARRIER_REQUEST)
        self.log_responses = log_responses
        self._scan = 0  # request bytes already searched for a newline (after MORE)
        self._rscan = 0  # same for replies
        self._stream = False  # after ``watch``: replies pass unframed

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if not data:
            return NOP_VERDICT
        if reply:
            return self._reply(data)
        return self._request(data)

    # --- requests ---------------------------------------------------------------------------

    def _request(self, data: Data) -> Verdict:
        pending = self.pending
        if pending.req_owed:
            return pending.take_owed(False)  # type: ignore[return-value]
        if pending.closing:
            return pending.closed_request(len(data))
        have = len(data)
        end = data.find(b"\n", self._scan)
        if end < 0:
            if have > MAX_LINE and not _is_retrieval(data):
                return self._too_long(have)
            self._scan = have
            return MORE, 1
        self._scan = 0
        if end > MAX_LINE and not _is_retrieval(data):
            return self._too_long(have)
        line = bytes(data[: end - 1 if end > 1 and data[end - 1] == 13 else end])
        if b"\0" in line:
            line = line[: line.index(b"\0")]
        toks = line.split(b" ")
        if b"" in toks:
            toks = [t for t in toks if t]
        n = end + 1
        spec = _COMMANDS.get(toks[0]) if toks else None
        if spec is None:
            # Unknown (or empty): memcached answers ERROR; only an allow-all rule passes it.
            name = key_text(toks[0][:64]) if toks else ""
            return self._decide(name, _NO_KEYS, False, K_UNIT, None, False, n, have)
        family, name, lo, hi = spec
        nargs = len(toks) - 1
        if family == _F_GET:
            return self._decide(name, tuple(toks[1:]), False, K_RETR, None, False, n, have)
        if family in (_F_STORE, _F_CAS):
            if nargs < lo or nargs > hi:
                # memcached: ERROR, and the data block is read as commands.
                return self._decide(name, tuple(toks[1:2]), False, K_UNIT, None, False, n, have)
            noreply = toks[-1] == b"noreply"
            kind = _K_NONE if noreply else K_UNIT
            key = toks[1]
            if len(key) > MAX_KEY:
                # memcached: CLIENT_ERROR, and the data block is read as commands.
                return self._decide(name, (key,), False, kind, None, noreply, n, have)
            size = _size(toks[4])
            if (
                size >= 0
                and _strtoul_ok(toks[2])
                and _strtol32(toks[3]) is not None
                and (family == _F_STORE or _strtoul_ok(toks[5]))
            ):
                n += size + 2
            # else memcached answers CLIENT_ERROR, and the data block is read as commands.
            return self._decide(name, (key,), False, kind, None, noreply, n, have)
        if family in (_F_KEYED, _F_NOREPLY):
            keys = tuple(toks[1:2]) if family == _F_KEYED else _NO_KEYS
            if nargs < lo or nargs > hi:
                return self._decide(name, keys, False, K_UNIT, None, False, n, have)
            noreply = toks[-1] == b"noreply"
            return self._decide(name, keys, False, _K_NONE if noreply else K_UNIT, None, noreply, n, have)
        if family >= _F_MG:
            return self._meta(family, name, toks, n, have)
        if family == _F_GAT:
            return self._decide(name, tuple(toks[2:]), False, K_RETR, None, False, n, have)
        if family == _F_ADMIN:
            noreply = (
                nargs > 0
                and toks[-1] == b"noreply"
                and (name in _ADMIN_NOREPLY or (name == "slabs" and toks[1] == b"automove"))
            )
            return self._decide(name, _NO_KEYS, False, _K_NONE if noreply else K_UNIT, None, noreply, n, have)
        if family == _F_STATS:
            return self._decide(name, _NO_KEYS, False, K_STATS, None, False, n, have)
        if family == _F_CRAWLER:
            kind = K_DUMP if nargs > 0 and toks[1] in (b"metadump", b"mgdump") else K_UNIT
            return self._decide(name, _NO_KEYS, False, kind, None, False, n, have)
        if family == _F_WATCH:
            return self._decide(name, _NO_KEYS, False, K_WATCH, None, False, n, have)
        # quit: no reply; the server closes the connection (a denied quit is answered).
        return self._decide(name, _NO_KEYS, False, _K_NONE, None, False, n, have)

    def _meta(self, family: int, name: str, toks: list[bytes], n: int, have: int) -> Verdict:
        if family == _F_MN or len(toks) < 2:
            return self._decide(name, _NO_KEYS, False, K_UNIT, None, False, n, have)
        key = toks[1]
        first_flag = 2
        if family == _F_MS:
            if len(key) > MAX_KEY or len(toks) < 3 or len(toks) >= 20:
                # memcached: CLIENT_ERROR before reading the size; the block is read as commands.
                return self._decide(name, (key,), False, K_UNIT, None, False, n, have)
            size = _size(toks[2])
            if size < 0:
                # memcached: CLIENT_ERROR before reading the block; it is read as commands.
                return self._decide(name, (key,), False, K_UNIT, None, False, n, have)
            n += size + 2
            first_flag = 3
        quiet = False
        key_error = False
        opaque = b""
        # A line memcached rejects is always answered (quiet mode never hides errors).
        valid = len(toks) < 20 and len(key) <= MAX_KEY
        seen: set[int] = set()
        for flag in toks[first_flag:]:
            c = flag[0]
            if c in seen:
                valid = False
            seen.add(c)
            if c == 113:  # q
                quiet = True
            elif c == 98:  # b: the key is base64
                decoded = _decode_b64_key(key)
                if decoded is None:
                    key_error = True
                    valid = False
                else:
                    key = decoded
            elif c in _META_PLAIN:
                if c == 79:  # O: opaque, up to 32 bytes, echoed in the reply
                    valid = valid and len(flag) <= 33
                    opaque = b" " + flag
            elif c in _META_SIGNED:
                valid = valid and _strtol32(flag[1:]) is not None
            elif c in _META_UNSIGNED:
                valid = valid and _strtoul_ok(flag[1:])
            elif c != 77 or len(flag) != 2:  # M<mode>
                valid = False
            elif family == _F_MS:
                valid = valid and flag[1] in b"EAPRS"
            elif family == _F_MA:
                valid = valid and flag[1] in b"I+D-"
        accept = _QUIET_ACCEPT.get(family) if quiet and valid else None
        return self._decide(name, (key,), key_error, K_UNIT, accept, False, n, have, opaque)

    def _decide(
        self,
        name: str,
        keys: tuple[bytes, ...],
        key_error: bool,
        kind: int,
        accept: Any,
        silent: bool,
        n: int,
        have: int,
        opaque: bytes = b"",
    ) -> Verdict:
        """Check policy for a parsed request of ``n`` bytes; PASS it or DROP and answer it.

        ``kind`` ``_K_NONE`` means the request gets no reply at all (``quit``, ``noreply``);
        ``silent`` that a denial is not answered (``noreply``).
        """
        ctx = self.ctx
        matches = ctx.matches
        if name in CONTROL_COMMANDS:
            allowed = True
        elif len(keys) <= 1:
            allowed = matches(MemcacheRequest(name, keys, key_error))
        else:
            allowed = True
            for key in keys:
                if not matches(MemcacheRequest(name, (key,))):
                    allowed = False
                    break
        if allowed:
            # Fields built lazily: most deployments log denials only (access_log.requests).
            ctx.log(EntryType.REQUEST, lambda: {"command": name, "keys": _log_keys(keys)})
            if kind >= 0 and not self.pending.push((kind, accept, name, opaque if accept else b"")):
                return self.pending.close(ERROR_PROTOCOL, _QUEUE_FULL, b"", have)
            return PASS, n
        ctx.log(EntryType.DENIED, {"command": name, "keys": _log_keys(keys)})
        if silent:
            return DROP, n
        verdict = self.pending.deny(name, DENIED_REPLY, n, have)
        return verdict if verdict is not None else self.pending.close(ERROR_PROTOCOL, _QUEUE_FULL, b"", have)

    def _too_long(self, have: int) -> Verdict:
        """memcached closes a connection on a line over 2048 bytes that is not a multi-key get."""
        self._scan = 0
        return self.pending.close(ERROR_INVALID_FRAME_LENGTH, _TOO_LONG, b"", have)

    # --- replies ----------------------------------------------------------------------------

    def _reply(self, data: Data) -> Verdict:
        pending = self.pending
        if pending.rep_owed:
            return pending.take_owed(True)  # type: ignore[return-value]
        if pending.held:
            return pending.release(data)
        if self._stream:
            return PASS, len(data)
        have = len(data)
        end = data.find(b"\n", self._rscan)
        if end < 0:
            if have > MAX_REPLY_LINE:
                return ERROR, ERROR_INVALID_FRAME_LENGTH
            self._rscan = have
            return MORE, 1
        self._rscan = 0
        if end > MAX_REPLY_LINE:
            return ERROR, ERROR_INVALID_FRAME_LENGTH
        stop = end - 1 if end > 0 and data[end - 1] == 13 else end
        sp = data.find(b" ", 0, stop)
        code = bytes(data[: sp if sp >= 0 else stop])
        n = end + 1
        unit = False
        if code == b"VALUE" or code == b"VA":
            toks = bytes(data[:stop]).split(b" ")
            size = toks[3] if code == b"VALUE" and len(toks) > 3 else toks[1] if len(toks) > 1 else b""
            if not _digits(size, 10):
                return ERROR, ERROR_PROTOCOL
            n += int(size) + 2
            unit = True
        q = pending.q
        while True:
            if not q:
                return unsolicited(self.ctx, code, n)
            head = q[0]
            accept = head[1]
            if accept is None or (code in accept and (not head[3] or _echoes(data, stop, head[3]))):
                break
            q.popleft()  # a maybe entry that was answered with silence
        kind = head[0]
        if kind == K_RETR:
            if unit:
                return PASS, n
        elif kind == K_STATS:
            if code in _STATS_MORE:
                return PASS, n
        elif kind == K_DUMP:
            if data.startswith(b"key=") or data.startswith(b"mg "):
                return PASS, n
        elif kind == K_WATCH and code == b"OK":
            self._stream = True
        return pending.complete(n, have, code, self.log_responses, data)
