"""The verdict engine: applies a parser's verdicts to the byte streams of one connection.

Sans-IO: bytes come in through :meth:`Engine.feed`, and go out through the ``send`` callback
given at construction; the relay (:mod:`proxyd.relay`) and the test harness
(:mod:`proxyd.testing`) are its only two drivers.

The relay may also hand the engine its transports (:meth:`PyEngine.relay`) and its readers to
the event loop (:meth:`PyEngine.read_client`, :meth:`PyEngine.read_server` as the transports'
``data_received``): a read the engine resolves then reaches the other transport's ``write``
with no relay code in between (on the compiled twin, no Python frame at all), and the engine
counts the bytes it read and wrote (:meth:`PyEngine.received`, :meth:`PyEngine.sent`). The
engine stays free of I/O policy: which transport, and when, is the relay's to say.

Theory of operation, per direction (``reply`` False: client to server; True: server to client):

- ``buf`` holds bytes the parser has seen but not consumed. The parser is called with all of it
  and answers one verdict at a time; PASS and DROP consume from the head, INJECT sends bytes the
  parser queued, MORE records how many bytes must be buffered before the next call.
- A PASS or DROP larger than ``buf`` ends the round and leaves ``skip`` bytes that later input
  consumes without calling the parser (so a 100 MiB memcache value is never buffered).
- Bytes queued with ``inject()`` are sent at the first *frame boundary* of their direction: at
  the INJECT op that names them, else at the end of a round, else as soon as a pending PASS
  is used up; never in the middle of a PASS-ed frame.
- A round stops at MORE, NOP, ERROR, an op reaching past the input, or an empty buffer. Every
  broken rule (n <= 0, INJECT beyond the queued bytes, MORE beyond ``buffer_limit``, unknown
  op, an exception) is an error for this connection only: the engine stops and reports it.
  What the round decided before the failure still goes out (bytes passed, injections at a
  frame boundary), so the outcome does not depend on how the input was segmented.

- *Hold*: a round that ends with NOP while bytes are still buffered leaves its direction
  **held**: the parser cannot take more of it until the other direction progresses (the
  redis parser's queue of owed replies is full; an HTTP request waits for the answer to its
  upgrade). While held, that direction's buffered bytes over ``buffer_limit`` are not an error:
  :meth:`Engine.held` says so (and ``on_hold(reply, held)`` reports every change), and the relay
  stops reading that direction, so at most the limit plus one read is ever held. After every
  round of the other direction, and when it ends, the held direction's round runs again on its
  buffered bytes (then, if that progressed, the first direction's if it is held, and so on
  until a round makes no progress); the hold clears when a round ends any other way, or when
  the other direction has ended and a round made no progress (nothing can release it then).
  An end of stream behind held bytes is kept until they are taken.

These are proxylib's semantics with its sharp edges filed off: the round stops at the first
ERROR, injection toward the other direction does not wait for that direction's next input,
and injected data has no size cap other than the buffer limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from proxyd.ops import Op
from proxyd.parser import Parser

SendFn = Callable[[bool, bytes | bytearray], None]


class EngineError(Exception):
    """Why the engine stopped a connection; ``kind`` names the class of failure."""

    def __init__(self, kind: str, message: str, *, code: int = 0) -> None:
        self.kind = kind  # parser_error | contract | exception | buffer_limit
        self.code = code
        super().__init__(message)


class Observer(Protocol):
    """Optional hook (used by the test harness) that sees every op and its bytes."""

    def op(self, reply: bool, op: Op, n: int) -> None: ...

    def passed(self, reply: bool, data: bytes) -> None: ...

    def dropped(self, reply: bool, data: bytes) -> None: ...

    def injected(self, reply: bool, data: bytes) -> None: ...


class Transport(Protocol):
    """What the engine uses of a transport it relays to (asyncio's, uvloop's)."""

    def write(self, data: bytes | bytearray) -> None: ...

    def pause_reading(self) -> None: ...


class _Side:
    """State of one direction of the stream."""

    __slots__ = ("buf", "dropped_bytes", "ended", "held", "inject_q", "skip", "skip_drop", "want")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.want = 0  # call the parser again once len(buf) >= want
        self.skip = 0  # bytes of a PASS/DROP that reached past the input, still to go
        self.skip_drop = False  # whether ``skip`` bytes are dropped (else passed)
        self.inject_q = bytearray()  # bytes the parser queued for this direction
        self.ended = False  # end of stream seen on this direction
        self.dropped_bytes = 0
        self.held = False  # the last round ended with NOP and bytes still buffered


class PyEngine:
    """Applies verdicts for one connection. ``parser=None`` relays bytes untouched (L4).

    The reference implementation; :data:`proxyd.native.Engine` is this class or its compiled
    twin (``proxyd._native.Engine``), which behaves the same (see :mod:`proxyd.native`).
    """

    __slots__ = (
        "_in_round", "_observer", "_on_error", "_on_hold", "_received", "_relay", "_send", "_sent", "_sides",
        "error", "limit", "parser",
    )  # fmt: skip

    def __init__(
        self,
        parser: Parser | None,
        send: SendFn,
        *,
        buffer_limit: int = 1 << 20,
        observer: Observer | None = None,
        on_error: Callable[[EngineError], None] | None = None,
        on_hold: Callable[[bool, bool], None] | None = None,
    ) -> None:
        self.parser = parser
        self.limit = buffer_limit
        self._send = send
        self._sides = (_Side(), _Side())
        self.error: EngineError | None = None
        self._observer = observer
        self._in_round = False
        self._on_error = on_error
        self._on_hold = on_hold
        #: Per direction: the transport its output is written to (None: through ``send``).
        self._relay: list[Transport | None] = [None, None]
        self._received = [0, 0]  # bytes read by read_client / read_server
        self._sent = [0, 0]  # bytes written to a relay transport

    # --- inputs ----------------------------------------------------------------------------

    def feed(self, reply: bool, data: bytes | bytearray) -> None:
        """Take bytes that arrived on one direction; raises nothing (see :attr:`error`)."""
        if self.error is not None or not data:
            return
        side = self._sides[reply]
        if side.skip:
            data = self._consume_skip(reply, side, data)
            if not data:
                return
        if self.parser is None:
            if self._observer is not None:
                self._observer.passed(reply, bytes(data))
            self._emit(reply, data)
            return
        buf = side.buf
        buf += data
        if len(buf) >= side.want:
            self._round(reply, side, end_stream=False)
            self._wake(not reply)
        if self.error is None and len(side.buf) > self.limit and not side.held:
            self._fail(EngineError("buffer_limit", f"more than {self.limit} unparsed bytes buffered"))

    def read_client(self, data: bytes) -> None:
        """A client transport's ``data_received``: count the bytes, then :meth:`feed` them."""
        self._received[0] += len(data)
        self.feed(False, data)

    def read_server(self, data: bytes) -> None:
        """An upstream transport's ``data_received``: as :meth:`read_client`; a server read that
        arrives while its direction is held pauses the upstream again (relay.py: a pause is
        enforced, not assumed)."""
        self._received[1] += len(data)
        upstream = self._relay[0]
        if self._sides[1].held and upstream is not None:
            upstream.pause_reading()
        self.feed(True, data)

    def relay(self, to_server: Transport | None, to_client: Transport | None) -> None:
        """Write each direction's output to a transport (counted), or through ``send`` (None)."""
        self._relay = [to_server, to_client]

    def feed_eof(self, reply: bool) -> int:
        """Mark the end of one direction's stream and give the parser a last look.

        Returns the number of bytes still buffered that were not forwarded (a frame left
        incomplete when the side closed); the caller logs it.
        """
        side = self._sides[reply]
        if side.ended:
            return 0
        side.ended = True
        if self.error is not None or self.parser is None:
            return 0
        if not side.skip:
            self._round(reply, side, end_stream=True)
        self._wake(not reply)
        if side.held and self.error is None:
            if not self._sides[not reply].ended:
                return 0  # kept: the rounds that follow the other direction's progress finish it
            self._set_held(reply, side, False)  # the other direction is over: it never will
        left = len(side.buf)
        side.buf.clear()
        return left

    def queue_inject(self, reply: bool, data: bytes) -> None:
        """Queue bytes for a direction (the ``ctx.inject`` of the parser API)."""
        if self.error is not None or not data:
            return
        side = self._sides[reply]
        side.inject_q += data
        if len(side.inject_q) > self.limit:
            self._fail(EngineError("buffer_limit", f"more than {self.limit} injected bytes queued"))
        elif not self._in_round:
            # Queued from outside a round (e.g. by the policy layer): flush at once if we can.
            self._flush_injections()

    # --- introspection ---------------------------------------------------------------------

    def buffered(self, reply: bool) -> int:
        """Bytes of one direction held for the parser (waiting on MORE)."""
        return len(self._sides[reply].buf)

    def dropped(self, reply: bool) -> int:
        """Bytes of one direction the parser dropped so far."""
        return self._sides[reply].dropped_bytes

    def held(self, reply: bool) -> bool:
        """Whether one direction is held (its parser waits on the other direction): its
        reader should pause until the hold clears."""
        return self._sides[reply].held

    def received(self, reply: bool) -> int:
        """Bytes of one direction read through :meth:`read_client` / :meth:`read_server`."""
        return self._received[reply]

    def sent(self, reply: bool) -> int:
        """Bytes of one direction written to its :meth:`relay` transport."""
        return self._sent[reply]

    # --- internals -------------------------------------------------------------------------

    def _consume_skip(self, reply: bool, side: _Side, data: bytes | bytearray) -> bytes | bytearray:
        n = len(data)
        k = side.skip if side.skip < n else n
        head = data if k == n else data[:k]
        side.skip -= k
        if side.skip_drop:
            side.dropped_bytes += k
            if self._observer is not None:
                self._observer.dropped(reply, bytes(head))
        else:
            if self._observer is not None:
                self._observer.passed(reply, bytes(head))
            self._emit(reply, head)
        if side.skip == 0:
            self._flush_injections()
        return b"" if k == n else data[k:]

    def _round(self, reply: bool, side: _Side, *, end_stream: bool) -> None:
        parser = self.parser
        assert parser is not None
        buf = side.buf
        out: list[bytes | bytearray] = []
        observer = self._observer
        injected = 0
        nop = False
        self._in_round = True
        try:
            while buf or end_stream:
                try:
                    op, n = parser.on_data(reply, end_stream, buf)
                except Exception as exc:  # the sandbox: any parser bug ends this connection only
                    self._flush(reply, out)
                    self._flush_injections()
                    self._fail(EngineError("exception", f"{type(exc).__name__}: {exc}"))
                    return
                if observer is not None:
                    observer.op(reply, op, n)
                if type(n) is not int or n <= 0:
                    if op == Op.NOP:
                        nop = True
                        break
                    self._flush(reply, out)
                    self._flush_injections()
                    self._fail(EngineError("contract", f"{_name(op)} with n={n!r}"))
                    return
                if op == Op.PASS or op == Op.DROP:
                    have = len(buf)
                    k = n if n < have else have
                    if op == Op.PASS:
                        if observer is not None:
                            observer.passed(reply, bytes(buf[:k]))
                        if k == have:
                            # The common case: everything buffered passes. Hand the buffer
                            # over instead of copying it out and emptying it.
                            out.append(buf)
                            buf = side.buf = bytearray()
                        else:
                            out.append(buf[:k])
                            del buf[:k]
                    else:
                        side.dropped_bytes += k
                        if observer is not None:
                            observer.dropped(reply, bytes(buf[:k]))
                        del buf[:k]
                    side.want = 0
                    if n > have:
                        side.skip = n - have
                        side.skip_drop = op == Op.DROP
                        break
                elif op == Op.MORE:
                    side.want = len(buf) + n
                    if side.want > self.limit:
                        self._flush(reply, out)
                        self._flush_injections()
                        self._fail(
                            EngineError(
                                "buffer_limit",
                                f"parser asked for {side.want} bytes, over the {self.limit} byte limit",
                            )
                        )
                        return
                    break
                elif op == Op.INJECT:
                    q = side.inject_q
                    if n > len(q):
                        self._flush(reply, out)
                        self._flush_injections()
                        self._fail(EngineError("contract", f"INJECT {n} with {len(q)} bytes queued"))
                        return
                    injected += n
                    if injected > self.limit:
                        # INJECT consumes no input: a parser injecting in a loop is stopped here.
                        self._flush(reply, out)
                        self._flush_injections()
                        self._fail(
                            EngineError("buffer_limit", f"more than {self.limit} bytes injected in one round")
                        )
                        return
                    chunk = bytes(q[:n])
                    del q[:n]
                    out.append(chunk)
                    if observer is not None:
                        observer.injected(reply, chunk)
                elif op == Op.ERROR:
                    self._flush(reply, out)
                    self._flush_injections()
                    self._fail(EngineError("parser_error", f"parser error {n}", code=n))
                    return
                elif op == Op.NOP:
                    nop = True
                    break
                else:
                    self._flush(reply, out)
                    self._flush_injections()
                    self._fail(EngineError("contract", f"unknown op {op!r}"))
                    return
                end_stream = end_stream and bool(buf)
            self._flush(reply, out)
        finally:
            self._in_round = False
        self._flush_injections()
        if self.error is None:
            self._set_held(reply, side, nop and bool(side.buf))

    def _set_held(self, reply: bool, side: _Side, held: bool) -> None:
        if held != side.held:
            side.held = held
            if self._on_hold is not None:
                self._on_hold(reply, held)

    def _wake(self, reply: bool) -> None:
        """The other direction progressed or ended: run held rounds again while they progress."""
        sides = self._sides
        while self.error is None:
            side = sides[reply]
            if not side.held:
                return
            before = len(side.buf)
            self._round(reply, side, end_stream=side.ended)
            if self.error is None and side.ended and not side.held:
                side.buf.clear()  # its stream ended: what the parser did not take never will be
            if side.held and len(side.buf) == before:
                # No progress: wait for the other direction again, unless it is over.
                if sides[not reply].ended:
                    self._set_held(reply, side, False)
                    if side.ended:
                        side.buf.clear()
                return
            reply = not reply

    def _flush(self, reply: bool, out: list[bytes | bytearray]) -> None:
        if out:
            self._emit(reply, out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _flush_injections(self) -> None:
        """Send queued injections of each direction that is at a frame boundary."""
        sides = self._sides
        if not (sides[0].inject_q or sides[1].inject_q):
            return
        if self.error is not None:
            return
        for reply in (False, True):
            side = self._sides[reply]
            if side.inject_q and not (side.skip and not side.skip_drop):
                chunk = bytes(side.inject_q)
                side.inject_q.clear()
                if self._observer is not None:
                    self._observer.injected(reply, chunk)
                self._emit(reply, chunk)

    def _emit(self, reply: bool, data: bytes | bytearray) -> None:
        transport = self._relay[reply]
        if transport is None:
            self._send(reply, data)
        else:
            self._sent[reply] += len(data)
            transport.write(data)

    def _fail(self, err: EngineError) -> None:
        if self.error is None:
            self.error = err
            for side in self._sides:
                side.buf.clear()
                side.inject_q.clear()
            if self._on_error is not None:
                self._on_error(err)


def _name(op: object) -> str:
    return op.name if isinstance(op, Op) else repr(op)


# --- the native twin ---------------------------------------------------------------------------
# proxyd._native.Engine follows PyEngine statement by statement. For the rare, subtle paths of
# the reference (a verdict that is not a 2-tuple, an op that is not an int, naming an op in a
# message) it calls these helpers, so the outcome is the reference's by construction.


def _unpack(result: Any) -> tuple[Any, Any]:
    op, n = result
    return op, n


def _opcode(op: object) -> int:
    for code in (Op.PASS, Op.DROP, Op.MORE, Op.INJECT, Op.ERROR, Op.NOP):
        if op == code:
            return int(code)
    return 0


# The choice between PyEngine and its twin is made in proxyd.native, the one selector for every
# twin. These names stay importable from here for code written before it existed.
_SELECTED = ("Engine", "IMPLEMENTATION", "native", "native_module", "pure_forced")

if TYPE_CHECKING:
    Engine = PyEngine
    IMPLEMENTATION: str
    native: Any

    def native_module() -> Any: ...

    def pure_forced() -> bool: ...

else:

    def __getattr__(name: str) -> Any:
        if name in _SELECTED:
            from proxyd import native as _selector

            return getattr(_selector, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
