"""redis: RESP2, RESP3 and inline commands, with command, ACL-category and key policy.

Package layout (each piece readable and testable alone):

- :mod:`.resp`: request framing as redis-server reads it, and the reply reader for every
  RESP2/RESP3 type;
- :mod:`.table`: the command table generated from a real redis-server (``commands.json``) and
  key extraction from Redis 7 key specs;
- :mod:`.rules`: the request the policy sees and the ``l7`` rule matchers (``command``,
  ``keyExact``, ``keyPrefix``, ``keyRegex``);
- :mod:`.parser`: the per-connection parser (theory of operation in its docstring).

Example policy::

    toPorts:
      - ports: [{port: "6379", protocol: TCP}]
        rules:
          l7proto: redis
          l7:
            - command: "@read"
              keyPrefix: "app:"
            - command: set
              keyPrefix: "app:session:"

A denied command is dropped and answered ``-NOPERM access denied`` in its place among the
replies. See ``docs/parsers/redis.md`` for the full behaviour.

``parser_config`` keys: ``max_inspect_bytes`` (default 65536): how much of a request may be
held to find its keys; ``proto_max_bulk_len`` (default 536870912, redis-server's own default):
a longer argument is a protocol error, as on the server; ``max_pending_bytes`` (default 1 MiB):
memory for the replies owed and the reply reader's open aggregates; when it is full, reading the
client pauses until replies drain it (the engine's hold), nothing is closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from proxyd.errors import ParserConfigError
from proxyd.native import native_module, parser_twins
from proxyd.parser import ConnectionContext, EntryType, Parser, ParserFactory, RuleMatcher
from proxyd.policy.flat import hand_over

from .parser import DEFAULT_INSPECT, DEFAULT_PENDING_BYTES, NOPERM, RedisParser, _key_text, native_table
from .resp import PROTO_MAX_BULK_LEN
from .rules import RULE_KEYS, RedisRequest, RedisRule, compile_rule

_native = native_module()
if _native is not None:
    # The native twin (proxyd._native.Redis) decides the common case itself, the policy included
    # (through the flattened-policy interface: RedisRule.flat gives its conditions, any other
    # matcher is called), and hands everything else to a RedisParser it keeps
    # (proxyd/_native_src/redis.c).
    _native.setup_redis(
        RedisParser=RedisParser,
        RedisRequest=RedisRequest,
        key_text=_key_text,
        table=native_table(),
        noperm=NOPERM,
        REQUEST=EntryType.REQUEST,
        DENIED=EntryType.DENIED,
    )
    hand_over(_native)

_INT_KEYS = {
    "max_inspect_bytes": (1024, 256 << 20),
    "proto_max_bulk_len": (1 << 20, 1 << 40),
    "max_pending_bytes": (1024, 1 << 30),
}


class RedisFactory(ParserFactory):
    """Creates redis parsers and compiles ``l7proto: redis`` rules."""

    name = "redis"
    rule_keys = RULE_KEYS
    description = "Redis RESP2/RESP3 and inline commands (command, @category and key policy)"

    def validate_config(self, config: Mapping[str, Any]) -> Any:
        values = {
            "max_inspect_bytes": DEFAULT_INSPECT,
            "proto_max_bulk_len": PROTO_MAX_BULK_LEN,
            "max_pending_bytes": DEFAULT_PENDING_BYTES,
        }
        for key, value in config.items():
            if key not in _INT_KEYS:
                known = ", ".join(_INT_KEYS)
                raise ParserConfigError(f"unknown key for parser 'redis' (known: {known})", key=str(key))
            lo, hi = _INT_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ParserConfigError(f"must be an integer from {lo} to {hi}, not {value!r}", key=key)
            values[key] = value
        return values

    def compile_rule(self, rule: Mapping[str, str]) -> RuleMatcher:
        return compile_rule(rule)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        cfg = config or {}
        args = (
            int(cfg.get("max_inspect_bytes", DEFAULT_INSPECT)),
            int(cfg.get("proto_max_bulk_len", PROTO_MAX_BULK_LEN)),
            int(cfg.get("max_pending_bytes", DEFAULT_PENDING_BYTES)),
        )
        twins = parser_twins(ctx)
        if twins is not None:
            # The native engine runs (or a test asked for it): the compiled twin of this parser.
            return cast(Parser, twins.Redis(ctx, *args))
        return RedisParser(ctx, *args)


__all__ = ["RedisFactory", "RedisParser", "RedisRequest", "RedisRule", "compile_rule"]
