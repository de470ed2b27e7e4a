"""Cassandra (CQL native protocol v3, v4, v5) parser package for ``l7proto: cassandra``.

- :mod:`.frames`: frame/envelope headers, v5 segments (CRC24/CRC32), body readers, compression.
- :mod:`.cql`: the CQL tokenizer and statement classifier.
- :mod:`.rules`: the ``query_action`` / ``query_table`` policy rules.
- :mod:`.parser`: the per-connection parser (theory of operation in its docstring).

``parser_config`` keys: ``max_frame_bytes`` (default 256 MiB), ``max_inspect_bytes`` (1 MiB),
``max_prepared`` (10000), ``enforce_use`` (false), ``check_prepare`` (false).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxyd.parser import ConnectionContext, Parser, ParserFactory, RuleMatcher
from proxyd.parsers.cassandra.parser import CassandraConfig, CassandraParser, validate_config
from proxyd.parsers.cassandra.rules import RULE_KEYS, CassandraRequest, CassandraRule, compile_rule


class CassandraFactory(ParserFactory):
    """Creates :class:`CassandraParser` instances and compiles cassandra ``l7`` rules."""

    name = "cassandra"
    rule_keys = RULE_KEYS
    description = "Apache Cassandra CQL native protocol v3/v4/v5 (query_action, query_table)"

    def validate_config(self, config: Mapping[str, Any]) -> CassandraConfig:
        return validate_config(config)

    def compile_rule(self, rule: Mapping[str, Any]) -> RuleMatcher:
        return compile_rule(rule)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        cfg = config if isinstance(config, CassandraConfig) else CassandraConfig()
        return CassandraParser(ctx, cfg)


__all__ = ["CassandraConfig", "CassandraFactory", "CassandraParser", "CassandraRequest", "CassandraRule"]
