"""Policy rules for ``l7proto: cassandra``: Cilium's ``query_action`` and ``query_table`` keys.

A rule matches a :class:`CassandraRequest` (one statement: a QUERY, a PREPARE-d statement run by
EXECUTE, or one member of a BATCH) when every key it has matches:

- ``query_action``: exactly the statement's action (``select``, ``insert``, ``create-table``,
  ``grant-permission``, ...; the list is :data:`proxyd.parsers.cassandra.cql.ACTIONS`). An
  unknown action is a :class:`~proxyd.errors.RuleError`.
- ``query_table``: an RE2 regular expression (Go's syntax, as in Cilium; matched in linear
  time) *searched* in ``keyspace.table`` (for keyspace actions such as ``use`` or
  ``drop-keyspace``: the keyspace name). Role, user and permission actions
  have no table, so combining them with ``query_table`` is rejected, as in Cilium.
  Unlike Cilium, a request without a table is matched against the empty string, so
  ``query_table: "^ks\\."`` never allows a role statement (fail closed).

Example::

    l7proto: cassandra
    l7:
      - query_action: select
        query_table: "^system(_schema)?\\."
      - query_action: insert
        query_table: "^app\\.events$"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.errors import RuleError
from proxyd.parsers.cassandra.cql import ACTIONS
from proxyd.policy.regex import RuleRegex, compile_rule_regex


@dataclass(frozen=True, slots=True)
class CassandraRequest:
    """What policy sees of one statement.

    ``table`` is ``keyspace.table`` (or the keyspace for keyspace actions, ``""`` when there
    is none); ``opcode`` is the frame's (``query``, ``execute``, ``batch``, ``prepare``).
    """

    action: str
    table: str
    opcode: str = "query"
    stream: int = 0


@dataclass(frozen=True, slots=True)
class CassandraRule:
    """A compiled ``l7`` rule; None means the key was absent (matches anything)."""

    action: str | None
    table: RuleRegex | None

    def matches(self, request: Any) -> bool:
        if not isinstance(request, CassandraRequest):
            return False
        if self.action is not None and self.action != request.action:
            return False
        return self.table is None or self.table.search(request.table)


RULE_KEYS = ("query_action", "query_table")


def compile_rule(rule: Mapping[str, Any]) -> CassandraRule:
    """Compile one ``l7`` rule; raises :class:`RuleError` naming the bad key."""
    action: str | None = None
    table: RuleRegex | None = None
    for key, value in rule.items():
        if key == "query_action":
            if not isinstance(value, str) or value not in ACTIONS:
                raise RuleError(f"unknown query_action {value!r} (known: {', '.join(sorted(ACTIONS))})", key)
            action = value
        elif key == "query_table":
            if not isinstance(value, str):
                raise RuleError(f"must be a string (a regular expression), not {value!r}", key)
            if value:
                table = compile_rule_regex(value, key)
        else:
            raise RuleError(
                f"unknown rule key for l7proto 'cassandra' (known: {', '.join(RULE_KEYS)})", str(key)
            )
    if action is not None and table is not None and ACTIONS[action] == "none":
        raise RuleError(
            f"query_action {action!r} has no table and cannot be combined with query_table", "query_table"
        )
    return CassandraRule(action, table)
