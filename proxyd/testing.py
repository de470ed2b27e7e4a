"""A socket-free harness for parser authors: feed bytes, read back verdicts and streams.

Example::

    from proxyd.testing import Harness
    from proxyd.ops import PASS, DROP

    h = Harness("r2d2", rules=[{"cmd": "READ"}])
    h.feed(b"READ a\\r\\nHALT\\r\\n")
    assert h.ops_of(False) == [(PASS, 8), (DROP, 6)]
    assert h.forwarded[False] == b"READ a\\r\\n"
    assert h.to_client == b"ERROR\\r\\n"

The harness drives the same :class:`proxyd.engine.Engine` and :class:`proxyd.context.Context` the
daemon uses, so what passes here behaves the same on the wire. Policy is given as a predicate, as
``rules`` (``l7`` rule dicts compiled by the factory, any match allows), or as an object with a
``decide(request)`` method (the policy layer's per-connection view).

``implementation`` picks the engine: ``"python"`` (the reference, :class:`proxyd.engine.PyEngine`),
``"native"`` (the compiled twin; ValueError when it is not built) or None for the one proxyd
runs with (see ``proxyd --version``). Parsers with a native twin (memcache) follow the engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxyd import engine as _engine
from proxyd.context import ALLOWED, ConnInfo, Context, L7Decision, L7Policy
from proxyd.engine import Engine, EngineError, PyEngine
from proxyd.ops import Op, Verdict
from proxyd.parser import Endpoint, Fields, ParserFactory

_SRC = Endpoint("10.0.0.1", 40000)
_DST = Endpoint("10.0.0.2", 80)


@dataclass
class LogEntry:
    """One access-log entry as the parser produced it."""

    entry_type: str  # request | response
    verdict: str  # forwarded | denied | audit
    fields: dict[str, Any]
    policy: str | None


class _RulesPolicy:
    def __init__(self, factory: ParserFactory, rules: Iterable[Mapping[str, str]], name: str) -> None:
        self.matchers = [factory.compile_rule(r) for r in rules]
        self.name = name

    def decide(self, request: Any) -> L7Decision:
        for m in self.matchers:
            if m.matches(request):
                return L7Decision(True, self.name)
        return L7Decision(False, self.name)


class _PredicatePolicy:
    def __init__(self, pred: Callable[[Any], bool]) -> None:
        self.pred = pred

    def decide(self, request: Any) -> L7Decision:
        return L7Decision(bool(self.pred(request)), "test")


class _AllowAll:
    def decide(self, request: Any) -> L7Decision:
        return ALLOWED


@dataclass
class _Recorder:
    ops: list[tuple[bool, Op, int]] = field(default_factory=list)
    passed_data: dict[bool, bytearray] = field(
        default_factory=lambda: {False: bytearray(), True: bytearray()}
    )
    dropped_data: dict[bool, bytearray] = field(
        default_factory=lambda: {False: bytearray(), True: bytearray()}
    )
    injected_data: dict[bool, bytearray] = field(
        default_factory=lambda: {False: bytearray(), True: bytearray()}
    )

    def op(self, reply: bool, op: Op, n: int) -> None:
        self.ops.append((reply, op, n))

    def passed(self, reply: bool, data: bytes) -> None:
        self.passed_data[reply] += data

    def dropped(self, reply: bool, data: bytes) -> None:
        self.dropped_data[reply] += data

    def injected(self, reply: bool, data: bytes) -> None:
        self.injected_data[reply] += data


class _ListSink:
    def __init__(self, entries: list[LogEntry]) -> None:
        self.entries = entries

    def l7(
        self,
        ctx: Context,
        entry_type: str,
        verdict: str,
        fields: Fields,
        policy: str | None,
    ) -> None:
        if callable(fields):
            fields = fields()
        self.entries.append(LogEntry(entry_type, verdict, dict(fields), policy))


class Harness:
    """One simulated connection through a parser.

    ``out[reply]`` is every byte sent in a direction (forwarded and injected, in order):
    ``out[False]`` reaches the server, ``out[True]`` the client. ``forwarded`` excludes
    injected bytes; ``dropped`` and ``injected`` hold what was discarded and produced.
    """

    def __init__(
        self,
        factory: ParserFactory | str,
        *,
        rules: Sequence[Mapping[str, str]] | None = None,
        policy: Callable[[Any], bool] | L7Policy | None = None,
        parser_config: Mapping[str, Any] | None = None,
        buffer_limit: int = 1 << 20,
        src: Endpoint = _SRC,
        dst: Endpoint = _DST,
        direction: str = "ingress",
        listener: str = "test",
        implementation: str | None = None,
    ) -> None:
        if isinstance(factory, str):
            from proxyd.registry import Registry

            factory = Registry.load().get(factory)
        self.factory = factory
        l7: L7Policy
        if rules is not None:
            l7 = _RulesPolicy(factory, rules, "test")
        elif policy is None:
            l7 = _AllowAll()
        elif hasattr(policy, "decide"):
            l7 = policy  # type: ignore[assignment]
        else:
            l7 = _PredicatePolicy(policy)  # type: ignore[arg-type]
        self.out: dict[bool, bytearray] = {False: bytearray(), True: bytearray()}
        self.log: list[LogEntry] = []
        #: Every change of a direction's hold, in order: ``(reply, held)``.
        self.holds: list[tuple[bool, bool]] = []
        self._rec = _Recorder()
        self.engine = engine_class(implementation)(
            None, self._send, buffer_limit=buffer_limit, observer=self._rec, on_hold=self._hold
        )
        info = ConnInfo(1, listener, direction, src, dst, factory.name)
        self.ctx = Context(info, self.engine, l7, _ListSink(self.log))
        config = factory.validate_config(parser_config or {})
        self.engine.parser = factory.create(self.ctx, config)
        self.unparsed_at_eof: dict[bool, int] = {False: 0, True: 0}

    def _send(self, reply: bool, data: bytes | bytearray) -> None:
        self.out[reply] += data

    def _hold(self, reply: bool, held: bool) -> None:
        self.holds.append((reply, held))

    # --- driving ---------------------------------------------------------------------------

    def feed(
        self,
        data: bytes,
        reply: bool = False,
        *,
        end_stream: bool = False,
        split: Iterable[int] | str | None = None,
        seed: int = 0,
    ) -> list[Verdict]:
        """Feed ``data`` on one direction, optionally split into segments.

        ``split`` is a list of segment sizes, ``"bytes"`` (one byte at a time) or
        ``"random"`` (random sizes from ``seed``). Returns the verdicts of this call.
        """
        start = len(self._rec.ops)
        for seg in _segments(data, split, seed):
            self.engine.feed(reply, seg)
        if end_stream:
            self.eof(reply)
        return [(op, n) for (_, op, n) in self._rec.ops[start:]]

    def eof(self, reply: bool = False) -> int:
        """End one direction's stream; returns bytes left unforwarded."""
        left = self.engine.feed_eof(reply)
        self.unparsed_at_eof[reply] = left
        return left

    # --- results ---------------------------------------------------------------------------

    @property
    def ops(self) -> list[tuple[bool, Op, int]]:
        """Every (reply, op, n) the parser answered, in order."""
        return list(self._rec.ops)

    def ops_of(self, reply: bool) -> list[Verdict]:
        return [(op, n) for (r, op, n) in self._rec.ops if r == reply]

    @property
    def forwarded(self) -> dict[bool, bytes]:
        """Bytes PASS-ed per direction (excluding injected ones)."""
        return {k: bytes(v) for k, v in self._rec.passed_data.items()}

    @property
    def dropped(self) -> dict[bool, bytes]:
        return {k: bytes(v) for k, v in self._rec.dropped_data.items()}

    @property
    def injected(self) -> dict[bool, bytes]:
        return {k: bytes(v) for k, v in self._rec.injected_data.items()}

    @property
    def to_server(self) -> bytes:
        return bytes(self.out[False])

    @property
    def to_client(self) -> bytes:
        return bytes(self.out[True])

    @property
    def error(self) -> EngineError | None:
        """Why the connection would have been closed, if it would."""
        return self.engine.error

    @property
    def closed(self) -> bool:
        return self.engine.error is not None

    def held(self, reply: bool = False) -> bool:
        """Whether the parser holds this direction (the relay would stop reading it)."""
        return self.engine.held(reply)


def engine_class(implementation: str | None) -> type[PyEngine]:
    """The engine class for ``implementation`` (``python``, ``native`` or None: the default)."""
    if implementation is None:
        return Engine
    if implementation == "python":
        return PyEngine
    if implementation == "native":
        mod = _engine.native_module()
        if mod is None:
            raise ValueError("the native engine is not built (proxyd._native)")
        return mod.Engine  # type: ignore[no-any-return]
    raise ValueError(f"implementation must be 'python' or 'native', not {implementation!r}")


#: Public names for tests that build their own Context (e.g. a relay written in the test).
RulesPolicy = _RulesPolicy
ListSink = _ListSink


def _segments(data: bytes, split: Iterable[int] | str | None, seed: int) -> list[bytes]:
    if split is None:
        return [data]
    if split == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    if split == "random":
        rng = random.Random(seed)
        sizes: list[int] = []
        total = 0
        while total < len(data):
            k = rng.randint(1, max(1, min(64, len(data) - total)))
            sizes.append(k)
            total += k
        split = sizes
    assert not isinstance(split, str)
    out: list[bytes] = []
    pos = 0
    for k in split:
        out.append(data[pos : pos + k])
        pos += k
    if pos < len(data):
        out.append(data[pos:])
    return out


def split_points(data: bytes) -> Iterable[list[bytes]]:
    """Every way of cutting ``data`` in two (for 'split at every byte' tables)."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
