"""The ``memcache`` parser: protocol detection and the factory.

memcached itself decides a connection's protocol from its first byte (``negotiating_prot``):
a byte >= 0x80 is the binary request magic, anything else starts a text (classic or meta)
command. The parser does the same on the first client byte and from then on hands both
directions to :class:`.text.TextProtocol` or :class:`.binary.BinaryProtocol`. It binds the
dialect's ``on_data`` onto the instance, so the engine calls the dialect directly afterwards
(one Python call per verdict on the hot path, not two).

When the connection runs on the native engine (``proxyd._native``; :mod:`proxyd.native`
decides), the factory creates the compiled twin of this parser (``proxyd._native.Memcache``)
instead: the same framing, pending queue and denial placement, called by the engine without a
Python call per verdict.
All three dialects (text, meta, binary) are native; policy decisions, rule matching (RE2
included) and the access log stay in Python and are called from it.

``parser_config`` keys: ``log_responses`` (bool, default true): write an access-log entry per
framed reply (``command``, ``status``). Turn it off where only requests matter; the sink
filters entries anyway, but skipping them saves work on the reply path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from proxyd.errors import ParserConfigError
from proxyd.native import native_module, parser_twins
from proxyd.ops import NOP_VERDICT, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, Parser, ParserFactory, RuleMatcher
from proxyd.policy.flat import hand_over

from . import binary, text
from .binary import BinaryProtocol
from .common import key_text, unsolicited_line
from .rules import RULE_KEYS, MemcacheRequest, compile_rule
from .text import TextProtocol

_native = native_module()
if _native is not None:
    _native.setup_memcache(
        MemcacheRequest=MemcacheRequest,
        REQUEST=EntryType.REQUEST,
        RESPONSE=EntryType.RESPONSE,
        DENIED=EntryType.DENIED,
        denied_reply=text.DENIED_REPLY,
        text_barrier=text.BARRIER_REQUEST,
        binary_barrier=binary.BARRIER_REQUEST,
        key_text=key_text,
    )
    # The native parser evaluates a connection's policy itself through the flattened-policy
    # interface (proxyd.policy.flat; MemcacheRule.flat gives its conditions, any other matcher
    # is called; see proxyd/_native_src/policy.c).
    hand_over(_native)


class MemcacheParser(Parser):
    """Per-connection parser; becomes its dialect once the first client byte is seen."""

    def __init__(self, ctx: ConnectionContext, log_responses: bool) -> None:
        self.ctx = ctx
        self.log_responses = log_responses
        self.dialect: TextProtocol | BinaryProtocol | None = None

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if not data:
            return NOP_VERDICT
        if reply:
            # Before the client's first byte only an unsolicited line can come (memcached's
            # "ERROR Too many open connections"): forwarded.
            return unsolicited_line(self.ctx, data)
        dialect: TextProtocol | BinaryProtocol
        if data[0] >= 0x80:
            dialect = BinaryProtocol(self.ctx, self.log_responses)
        else:
            dialect = TextProtocol(self.ctx, self.log_responses)
        self.dialect = dialect
        self.on_data = dialect.on_data  # type: ignore[method-assign]
        return dialect.on_data(reply, end_stream, data)

    def pending(self) -> list[bool]:
        """For each entry of the pending-reply queue, whether it is a *maybe* entry.

        Introspection for tests, shared with the native twin.
        """
        if self.dialect is None:
            return []
        return [entry[1] is not None for entry in self.dialect.pending.q]


class MemcacheFactory(ParserFactory):
    """Creates memcache parsers and compiles ``l7proto: memcache`` rules."""

    name = "memcache"
    rule_keys = RULE_KEYS
    description = "memcached text, meta and binary protocols (command and key policy)"

    def validate_config(self, config: Mapping[str, Any]) -> Any:
        log_responses = True
        for key, value in config.items():
            if key == "log_responses":
                if not isinstance(value, bool):
                    raise ParserConfigError("must be true or false", key="log_responses")
                log_responses = value
            else:
                raise ParserConfigError(
                    "unknown key for parser 'memcache' (known: log_responses)", key=str(key)
                )
        return {"log_responses": log_responses}

    def compile_rule(self, rule: Mapping[str, Any]) -> RuleMatcher:
        return compile_rule(rule)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        log_responses = True if config is None else bool(config.get("log_responses", True))
        # Response entries the access-log mode discards are not built at all.
        log_responses = log_responses and bool(getattr(ctx, "logs_responses", True))
        twins = parser_twins(ctx)
        if twins is not None:
            # The native engine runs (or a test asked for it): the compiled twin of this parser.
            return cast(Parser, twins.Memcache(ctx, log_responses))
        return MemcacheParser(ctx, log_responses)
