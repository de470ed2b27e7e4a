"""Policy side of the redis parser: the request the policy sees and the ``l7`` rule matchers.

Rule keys::

    l7proto: redis
    l7:
      - command: get                 # a command, with all its subcommands
        keyPrefix: "app:"
      - command: "config|get"        # one subcommand, spelt as Redis ACLs spell it
      - command: "@read"             # an ACL category (Redis 7's ACL CAT), or @all
        keyRegex: "^cache:[0-9]+$"   # RE2, searched in the key: anchor with ^ and $
      - command: "@pubsub"
        keyExact: "news"             # Pub/Sub channels are keys

- ``command``: a command name (case-insensitive) known to the command table, ``name|sub``, or
  ``@category``; absent: every command. ``@all`` covers every command, unknown ones included.
- ``keyExact``, ``keyPrefix``, ``keyRegex``: conditions on a key, ANDed when several are given.
- A command is allowed when **each** of its keys is allowed by some rule whose ``command``
  covers it (different keys may be allowed by different rules). A command without keys, or
  whose keys cannot be known (an unknown command, arguments past the inspection budget,
  ``SORT ... GET``), needs a rule that covers it and has no key condition.

The parser asks the policy once per key with a :class:`RedisRequest` carrying that key, or once
with ``key=None`` for the keyless case: a rule with a key condition never matches ``None``.
Keys are bytes on the wire: ``keyExact`` and ``keyPrefix`` compare bytes (the rule's UTF-8);
``keyRegex`` searches the key's UTF-8 text, where each byte that is not UTF-8 reads as U+FFFD
(so only a pattern that accepts any character there can match it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from proxyd.errors import RuleError
from proxyd.parser import ALLOW_ALL, RuleMatcher
from proxyd.policy import flat
from proxyd.policy.regex import RuleRegex, compile_rule_regex

from .table import CATEGORIES, COMMANDS, NAMES

RULE_KEYS = ("command", "keyExact", "keyPrefix", "keyRegex")


class RedisRequest(NamedTuple):
    """One policy question about a command.

    ``name`` is the policy name (``get``, ``config|get``; lower case), ``base`` the top-level
    command, ``categories`` its ACL categories (empty for an unknown command), ``known``
    whether the command table has it, ``key`` one key or channel, or None (keyless, or keys
    unknown).
    """

    name: str
    base: str
    categories: frozenset[str]
    known: bool
    key: bytes | None

    def values(self, field: str) -> tuple[Any, ...]:
        """The values of ``field`` (the ``FIELD_*`` names) for flat conditions."""
        if field == FIELD_NAME:
            return (self.name,)
        if field == FIELD_BASE:
            return (self.base,)
        if field == FIELD_KNOWN:
            return (self.known,)
        if field == FIELD_KEY:
            return () if self.key is None else (self.key,)
        raise ValueError(f"redis requests have no field {field!r}")


#: The request fields of the flattened-policy interface (proxyd.policy.flat) for redis, each
#: with one value: ``name`` (the policy name), ``base`` (the top-level command), ``known``
#: (whether the command table has it), and ``key``, none when the question is keyless.
FIELD_NAME = "name"
FIELD_BASE = "base"
FIELD_KNOWN = "known"
FIELD_KEY = "key"


def _names_by_category() -> dict[str, frozenset[str]]:
    """The policy names of the known commands and subcommands in each ACL category.

    A known command's policy name names one table entry, whose categories are the request's:
    so ``category in request.categories`` is ``known and name in`` this set, a flat condition.
    """
    out: dict[str, set[str]] = {}
    for cmd in COMMANDS.values():
        for entry in (cmd, *cmd.subcommands.values()):
            for cat in entry.categories:
                out.setdefault(cat, set()).add(entry.name)
    return {cat: frozenset(names) for cat, names in out.items()}


_BY_CATEGORY = _names_by_category()


class RedisRule:
    """A compiled rule; see the module docstring."""

    __slots__ = ("base", "category", "exact", "keyed", "name", "prefix", "regex", "source")

    def __init__(
        self,
        command: str | None,
        exact: bytes | None,
        prefix: bytes | None,
        regex: RuleRegex | None,
        source: Mapping[str, str],
    ) -> None:
        self.base: str | None = None
        self.name: str | None = None
        self.category: str | None = None
        if command is not None:
            if command.startswith("@"):
                self.category = command[1:]
            elif "|" in command:
                self.name = command
            else:
                self.base = command
        self.exact = exact
        self.prefix = prefix
        self.regex = regex
        self.keyed = exact is not None or prefix is not None or regex is not None
        self.source = dict(source)

    def covers(self, request: RedisRequest) -> bool:
        """Whether the rule's ``command`` covers the request's command."""
        if self.base is not None:
            return request.base == self.base
        if self.name is not None:
            return request.name == self.name
        if self.category is not None:
            return self.category == "all" or self.category in request.categories
        return True

    def matches(self, request: Any) -> bool:
        if not isinstance(request, RedisRequest) or not self.covers(request):
            return False
        if not self.keyed:
            return True
        key = request.key
        if key is None:
            return False
        if self.exact is not None and key != self.exact:
            return False
        if self.prefix is not None and not key.startswith(self.prefix):
            return False
        return self.regex is None or self.regex.search(key)

    def flat(self) -> tuple[flat.Condition, ...]:
        """The rule as flat conditions (proxyd.policy.flat), with :meth:`matches`' answers."""
        out: list[flat.Condition] = []
        if self.base is not None:
            out.append((FIELD_BASE, flat.EXACT, self.base))
        elif self.name is not None:
            out.append((FIELD_NAME, flat.EXACT, self.name))
        elif self.category is not None and self.category != "all":
            out.append((FIELD_KNOWN, flat.EXACT, True))
            out.append((FIELD_NAME, flat.IN, _BY_CATEGORY.get(self.category, frozenset())))
        if self.exact is not None:
            out.append((FIELD_KEY, flat.EXACT, self.exact))
        if self.prefix is not None:
            out.append((FIELD_KEY, flat.PREFIX, self.prefix))
        if self.regex is not None:
            out.append((FIELD_KEY, flat.REGEX, flat.search(self.regex)))
        return tuple(out)

    def __repr__(self) -> str:
        return f"RedisRule({self.source!r})"


def _utf8(key: str, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RuleError(f"not encodable as UTF-8: {value!r}", key) from exc


def _command(value: str) -> str:
    v = value.strip().lower()
    if v.startswith("@"):
        if v[1:] not in CATEGORIES:
            known = ", ".join(sorted("@" + c for c in CATEGORIES))
            raise RuleError(f"unknown ACL category {value!r} (known: {known})", "command")
        return v
    if v not in NAMES:
        base, _, sub = v.partition("|")
        if base in COMMANDS and sub:
            subs = ", ".join(sorted(COMMANDS[base].subcommands)) or "none"
            raise RuleError(f"unknown subcommand {value!r} (subcommands of {base}: {subs})", "command")
        raise RuleError(
            f"unknown redis command {value!r} (a command such as get or config|get, or a category "
            "such as @read; unknown commands are allowed only by a rule without 'command' or @all)",
            "command",
        )
    return v


def compile_rule(rule: Mapping[str, str]) -> RuleMatcher:
    """Compile one ``l7`` rule; raises :class:`RuleError` naming the offending key."""
    command: str | None = None
    exact: bytes | None = None
    prefix: bytes | None = None
    regex: RuleRegex | None = None
    key_field: str | None = None
    for key, value in rule.items():
        if key not in RULE_KEYS:
            raise RuleError(f"unknown rule key for l7proto 'redis' (known: {', '.join(RULE_KEYS)})", str(key))
        if not isinstance(value, str):
            raise RuleError(f"must be a string, not {type(value).__name__}", key)
        if not value:
            raise RuleError("must not be empty", key)
        if key == "command":
            command = _command(value)
            continue
        key_field = key
        if key == "keyExact":
            exact = _utf8(key, value)
        elif key == "keyPrefix":
            prefix = _utf8(key, value)
        else:
            regex = compile_rule_regex(value, key)
    if key_field is not None and command is not None and not command.startswith("@"):
        base, _, sub = command.partition("|")
        entry = COMMANDS[base]
        if sub:
            entry = entry.subcommands[sub]
        if not entry.has_keys and not any(s.has_keys for s in entry.subcommands.values()):
            raise RuleError(
                f"command {rule['command']!r} takes no key, so a key condition cannot apply", key_field
            )
    if command is None and key_field is None:
        return ALLOW_ALL
    return RedisRule(command, exact, prefix, regex, rule)
