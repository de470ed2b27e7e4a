"""Policy side of the memcache parser: the parsed request and the ``l7`` rule matchers.

Rule keys (Cilium's memcached rule model, so existing policies carry over)::

    l7proto: memcache
    l7:
      - command: get                 # a command name or a group (below)
        keyPrefix: "alliance/fleet/"
      - command: writeGroup
        keyRegex: "^alliance/fleet/[a-z]+$"
      - command: stats               # a keyless command: no key constraint allowed
      - {}                           # allows everything

- ``command``: one command name (``set``, ``mg``, ``flush_all``, a binary-only name such as
  ``noop``) or a group: ``get`` (get, gets, bget), ``gat`` (gat, gats), ``storage`` (set add
  replace append prepend cas incr decr), ``writeGroup`` (storage plus delete and touch),
  ``meta`` (mg ms md ma me mn). Binary opcodes map to the same names (``GetKQ`` is ``get``,
  ``IncrementQ`` is ``incr``, ``Stat`` is ``stats``, ``Flush`` is ``flush_all``, ...). The groups
  do not contain meta commands: a meta request is matched by its own name (``mg``, ``ms``, ...)
  or ``meta`` only, since one meta command covers several classic ones (``mg`` with ``T`` also
  touches, ``ms`` with ``MA`` appends); a policy written for classic clients stays closed to them.
- ``keyExact``, ``keyPrefix``, ``keyRegex`` (RE2, Go's syntax as in Cilium, searched; matched in
  linear time whatever the key): constraints on the key,
  ANDed when several are given. A request with several keys (multi-key ``get``) is allowed only
  when every key is allowed (the parser asks the policy once per key). A base64 meta key (flag
  ``b``) is decoded first; one that is not canonical base64 fails every key constraint.
  Keys are bytes on the wire; rules compare against their UTF-8 encoding.
- A key constraint needs a ``command`` and must not name a keyless command only (``stats``,
  ``version``, ``flush_all``, ...): such a rule is rejected rather than silently meaningless.
  A keyless request (``mn`` under ``meta``) never satisfies a key constraint.
- A rule without ``command`` and key allows everything. Unknown keys, unknown commands, empty
  values and bad regular expressions raise :class:`proxyd.errors.RuleError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from proxyd.errors import RuleError
from proxyd.parser import ALLOW_ALL, RuleMatcher
from proxyd.policy import flat
from proxyd.policy.regex import RuleRegex, compile_rule_regex

#: The request fields of the flattened-policy interface (proxyd.policy.flat) for memcache:
#: ``command`` has one value, the policy command name; ``key`` one per key, and none when the
#: request has no key or a key could not be decoded (which fails every key constraint).
FIELD_COMMAND = "command"
FIELD_KEY = "key"


class MemcacheRequest(NamedTuple):
    """One parsed request as the policy sees it.

    ``command`` is the policy command name; ``keys`` the raw key bytes (one entry per key,
    empty for keyless commands); ``key_error`` is True when a key could not be decoded
    (non-canonical base64), which fails every key constraint.
    """

    command: str
    keys: tuple[bytes, ...]
    key_error: bool = False

    def values(self, field: str) -> tuple[Any, ...]:
        """The values of ``field`` (:data:`FIELD_COMMAND`, :data:`FIELD_KEY`) for flat conditions."""
        if field == FIELD_COMMAND:
            return (self.command,)
        if field == FIELD_KEY:
            return () if self.key_error else self.keys
        raise ValueError(f"memcache requests have no field {field!r}")


#: Commands whose requests carry keys, by their policy names.
KEYED_COMMANDS = frozenset(
    {
        "get", "gets", "gat", "gats", "set", "add", "replace", "append", "prepend", "cas",
        "delete", "incr", "decr", "touch", "mg", "ms", "md", "ma", "me",
        # binary-only range operations (not implemented by memcached, kept from Cilium)
        "rget", "rset", "rsetq", "rappend", "rappendq", "rprepend", "rprependq", "rdelete",
        "rdeleteq", "rincr", "rincrq", "rdecr", "rdecrq",
    }
)  # fmt: skip

#: Commands without keys.
KEYLESS_COMMANDS = frozenset(
    {
        "flush_all", "stats", "version", "verbosity", "quit", "shutdown", "cache_memlimit",
        "slabs", "lru_crawler", "lru", "watch", "misbehave", "debugtime", "extstore",
        "refresh_certs", "mn", "noop", "sasl-list-mechs", "sasl-auth", "sasl-step",
        "set-vbucket", "get-vbucket", "del-vbucket", "tap-connect", "tap-mutation", "tap-delete",
        "tap-flush", "tap-opaque", "tap-vbucket-set", "tap-checkpoint-start",
        "tap-checkpoint-end",
    }
)  # fmt: skip

_STORAGE = frozenset({"set", "add", "replace", "append", "prepend", "cas", "incr", "decr"})

#: Rule ``command`` values: every command name, plus the groups.
COMMAND_GROUPS: dict[str, frozenset[str]] = {
    name: frozenset({name}) for name in KEYED_COMMANDS | KEYLESS_COMMANDS
}
COMMAND_GROUPS.update(
    {
        "get": frozenset({"get", "gets"}),
        "gat": frozenset({"gat", "gats"}),
        "storage": _STORAGE,
        "writeGroup": _STORAGE | {"delete", "touch"},
        "meta": frozenset({"mg", "ms", "md", "ma", "me", "mn"}),
    }
)

RULE_KEYS = ("command", "keyExact", "keyPrefix", "keyRegex")

#: Protocol control that touches no data: always allowed (and still logged). libmemcached ends
#: every quiet multi-get with a binary NoOp and says goodbye with Quit; denying them breaks a
#: client whose policy allows what it actually asked for.
CONTROL_COMMANDS = frozenset({"noop", "quit", "mn"})


class MemcacheRule:
    """A compiled ``l7`` rule; see the module docstring for the semantics."""

    __slots__ = ("commands", "exact", "prefix", "regex", "source")

    def __init__(
        self,
        commands: frozenset[str] | None,
        exact: bytes | None,
        prefix: bytes | None,
        regex: RuleRegex | None,
        source: Mapping[str, Any],
    ) -> None:
        self.commands = commands
        self.exact = exact
        self.prefix = prefix
        self.regex = regex
        self.source = dict(source)

    def matches(self, request: Any) -> bool:
        if not isinstance(request, MemcacheRequest):
            return False
        commands = self.commands
        if commands is not None and request.command not in commands:
            return False
        exact, prefix, regex = self.exact, self.prefix, self.regex
        if exact is None and prefix is None and regex is None:
            return True
        keys = request.keys
        if request.key_error or not keys:
            return False
        for key in keys:
            if exact is not None and key != exact:
                return False
            if prefix is not None and not key.startswith(prefix):
                return False
            if regex is not None and not regex.search(key):
                return False
        return True

    def flat(self) -> tuple[flat.Condition, ...]:
        """The rule as flat conditions (proxyd.policy.flat), with :meth:`matches`' answers."""
        out: list[flat.Condition] = []
        if self.commands is not None:
            out.append((FIELD_COMMAND, flat.IN, self.commands))
        if self.exact is not None:
            out.append((FIELD_KEY, flat.EXACT, self.exact))
        if self.prefix is not None:
            out.append((FIELD_KEY, flat.PREFIX, self.prefix))
        if self.regex is not None:
            out.append((FIELD_KEY, flat.REGEX, flat.search(self.regex)))
        return tuple(out)

    def __repr__(self) -> str:
        return f"MemcacheRule({self.source!r})"


def _utf8(key: str, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RuleError(f"not encodable as UTF-8: {value!r}", key) from exc


def compile_rule(rule: Mapping[str, Any]) -> RuleMatcher:
    """Compile one ``l7`` rule; raises :class:`RuleError` naming the offending key."""
    commands: frozenset[str] | None = None
    exact: bytes | None = None
    prefix: bytes | None = None
    regex: RuleRegex | None = None
    key_field: str | None = None
    for key, value in rule.items():
        if key not in RULE_KEYS:
            raise RuleError(
                f"unknown rule key for l7proto 'memcache' (known: {', '.join(RULE_KEYS)})", str(key)
            )
        if not isinstance(value, str):
            raise RuleError(f"must be a string, not {type(value).__name__}", key)
        if not value:
            raise RuleError("must not be empty", key)
        if key == "command":
            group = COMMAND_GROUPS.get(value)
            if group is None:
                raise RuleError(
                    f"unknown memcache command or group {value!r} (groups: get, gat, storage, "
                    "writeGroup, meta; or a command name such as set, delete, mg, stats)",
                    key,
                )
            commands = group
            continue
        key_field = key
        if key == "keyExact":
            exact = _utf8(key, value)
        elif key == "keyPrefix":
            prefix = _utf8(key, value)
        else:
            regex = compile_rule_regex(value, key)
    if key_field is not None:
        if commands is None:
            raise RuleError("a key constraint needs a 'command'", key_field)
        if commands <= KEYLESS_COMMANDS:
            raise RuleError(
                f"command {rule['command']!r} takes no key, so a key constraint cannot apply",
                key_field,
            )
    if commands is None:
        return ALLOW_ALL
    return MemcacheRule(commands, exact, prefix, regex, rule)
