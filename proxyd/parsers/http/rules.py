"""Policy side of the http parser: the request policy sees, and Cilium's ``rules.http`` matchers.

A rule's fields are optional and all must match; ``{}`` allows every request::

    rules:
      http:
        - method: GET
          path: "/public/.*"
        - method: "POST|PUT"
          path: "/api/v1/.*"
          host: "api\\.example\\.com(:8080)?"
          headers: ["X-Team: blue", "Authorization"]
          headerMatches:
            - {name: X-Audit, value: "on", mismatch: ADD}

- ``method``, ``path``, ``host``: RE2 regular expressions, matched against the whole value
  (the method; the normalised path with the query as sent, see :mod:`.normalize`; the Host
  value, port included).
- ``headers``: ``"Name"`` (present) or ``"Name: value"`` (a field of that name with exactly
  that value). Names are case-insensitive, values are not.
- ``headerMatches``: ``{name, value, mismatch}``. A field of that name with exactly ``value``
  (any value when ``value`` is empty) matches and changes nothing. Otherwise ``mismatch``
  decides: absent, the rule does not match; ``LOG`` matches and logs the mismatch; ``ADD``
  matches and adds ``name: value`` as the last field; ``DELETE`` matches and removes every
  field of that name; ``REPLACE`` matches and sets the first field of that name to
  ``name: value`` in place (removing the others; added last when there is none). ``secret``
  is rejected (proxyd has no secret store), and so is rewriting Content-Length or
  Transfer-Encoding (the request is framed by the fields it arrived with).

When a rule with mismatch actions matches, it records them on the request; the parser applies
the first matching rule's actions (policy stops at the first rule that allows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from proxyd.errors import RuleError
from proxyd.policy import flat
from proxyd.policy.regex import RuleRegex, compile_rule_regex

from .framing import _FIELD_VALUE, TOKEN_RE

RULE_KEYS = ("method", "path", "host", "headers", "headerMatches")
MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding"})


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One compiled ``headerMatches`` entry; ``value`` "" means any value."""

    name: str  # as the rule spells it
    lname: str
    value: str
    mismatch: str | None


class HttpRequest(NamedTuple):
    """One request as the policy sees it (a tuple: cheap to build on the hot path).

    ``headers`` are (lower-case name, value) pairs in order. ``actions``, when a list, is
    filled by the first matching rule that has mismatch actions (see the module docstring);
    None: the caller does not apply rewrites.
    """

    method: str
    path: str
    host: str
    version: str
    headers: tuple[tuple[str, str], ...]
    actions: list[HeaderMatch] | None = None

    def has(self, lname: str, value: str | None) -> bool:
        return any(n == lname and (value is None or v == value) for n, v in self.headers)

    def values(self, field: str) -> tuple[Any, ...]:
        """The values of ``field`` (the ``FIELD_*`` names) for flat conditions: one each."""
        if field == FIELD_METHOD:
            return (self.method,)
        if field == FIELD_PATH:
            return (self.path,)
        if field == FIELD_HOST:
            return (self.host,)
        raise ValueError(f"http requests have no field {field!r}")


#: The request fields of the flattened-policy interface (proxyd.policy.flat) for http, each
#: with one value (str): the method, the path as the policy sees it, the Host value ("" when
#: there is none). Header conditions have no flat form (a field may repeat): they are calls.
FIELD_METHOD = "method"
FIELD_PATH = "path"
FIELD_HOST = "host"


@dataclass(frozen=True, slots=True)
class HttpRule:
    """A compiled ``rules.http`` entry."""

    method: RuleRegex | None
    path: RuleRegex | None
    host: RuleRegex | None
    headers: tuple[tuple[str, str | None], ...]
    header_matches: tuple[HeaderMatch, ...]

    def matches(self, request: Any) -> bool:
        if not isinstance(request, HttpRequest):
            return False
        if self.method is not None and not self.method.fullmatch(request.method):
            return False
        if self.path is not None and not self.path.fullmatch(request.path):
            return False
        if self.host is not None and not self.host.fullmatch(request.host):
            return False
        for lname, value in self.headers:
            if not request.has(lname, value):
                return False
        actions: list[HeaderMatch] = []
        for hm in self.header_matches:
            if request.has(hm.lname, hm.value or None):
                continue
            if hm.mismatch is None:
                return False
            actions.append(hm)
        if actions and request.actions is not None and not request.actions:
            request.actions.extend(actions)
        return True

    def has_headers(self, request: HttpRequest) -> bool:
        """Whether ``request`` has every field ``headers`` asks for (the flat ``call`` condition)."""
        return all(request.has(lname, value) for lname, value in self.headers)

    def flat(self) -> tuple[flat.Condition, ...]:
        """The rule as flat conditions (proxyd.policy.flat), with :meth:`matches`' answers.

        A rule with ``headerMatches`` is deferred to ``ctx.matches``: its mismatch actions are
        recorded on the request the parser then rewrites, which only the Python path does.
        """
        if self.header_matches:
            return ((None, flat.DEFER, None),)
        out: list[flat.Condition] = []
        for field, rx in ((FIELD_METHOD, self.method), (FIELD_PATH, self.path), (FIELD_HOST, self.host)):
            if rx is not None:
                out.append((field, flat.REGEX, flat.fullmatch(rx)))
        if self.headers:
            out.append((None, flat.CALL, self.has_headers))
        return tuple(out)


def _header_name(value: str, key: str) -> str:
    if TOKEN_RE.fullmatch(value.encode("latin-1", "replace")) is None:
        raise RuleError(f"{value!r} is not a valid header name", key)
    return value


def _header_value(value: str, key: str) -> str:
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise RuleError(f"header value {value!r} is not Latin-1 text", key) from None
    if _FIELD_VALUE.fullmatch(raw) is None or raw != raw.strip(b" \t"):
        raise RuleError(f"header value {value!r} has control characters or surrounding whitespace", key)
    return value


def _headers(value: Any, key: str) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise RuleError('must be a list of "Name" or "Name: value" strings', key)
    out: list[tuple[str, str | None]] = []
    for item in value:
        if not isinstance(item, str):
            raise RuleError(f'must be a list of "Name" or "Name: value" strings, not {item!r}', key)
        name, colon, val = item.partition(":")
        name = _header_name(name.strip(), key)
        out.append((name.lower(), _header_value(val.strip(" \t"), key) if colon else None))
    return tuple(out)


def _header_matches(value: Any, key: str) -> tuple[HeaderMatch, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise RuleError("must be a list of {name, value, mismatch} mappings", key)
    out: list[HeaderMatch] = []
    for i, item in enumerate(value):
        where = f"[{i}]"
        if not isinstance(item, Mapping):
            raise RuleError(f"{where}: must be a mapping with name, value, mismatch", key)
        name = value_ = ""
        mismatch: str | None = None
        for k, v in item.items():
            if k == "secret":
                raise RuleError(f"{where}.secret: not supported (proxyd has no secret store)", key)
            if k not in ("name", "value", "mismatch"):
                raise RuleError(f"{where}: unknown key {k!r} (known: name, value, mismatch)", key)
            if not isinstance(v, str):
                raise RuleError(f"{where}.{k}: must be a string, not {v!r}", key)
            if k == "name":
                name = _header_name(v, key)
            elif k == "value":
                value_ = _header_value(v, key)
            elif v:
                if v not in MISMATCH_ACTIONS:
                    raise RuleError(
                        f"{where}.mismatch: {v!r} is not one of {', '.join(MISMATCH_ACTIONS)}", key
                    )
                mismatch = v
        if not name:
            raise RuleError(f"{where}.name: missing", key)
        if mismatch in ("ADD", "DELETE", "REPLACE") and name.lower() in _FRAMING_FIELDS:
            raise RuleError(f"{where}: rewriting {name} would change how the server frames the request", key)
        out.append(HeaderMatch(name, name.lower(), value_, mismatch))
    return tuple(out)


def compile_rule(rule: Mapping[str, Any]) -> HttpRule:
    """Compile one ``rules.http`` entry; raises :class:`RuleError` naming the bad key."""
    method = path = host = None
    headers: tuple[tuple[str, str | None], ...] = ()
    matches: tuple[HeaderMatch, ...] = ()
    for key, value in rule.items():
        if key == "method":
            method = compile_rule_regex(value, key)
        elif key == "path":
            path = compile_rule_regex(value, key)
        elif key == "host":
            host = compile_rule_regex(value, key)
        elif key == "headers":
            headers = _headers(value, key)
        elif key == "headerMatches":
            matches = _header_matches(value, key)
        else:
            raise RuleError(f"unknown rule key for l7proto 'http' (known: {', '.join(RULE_KEYS)})", str(key))
    return HttpRule(method, path, host, headers, matches)


def describe(rule: HttpRule) -> dict[str, Any]:
    """The rule as data (for logs and explain)."""
    out: dict[str, Any] = {}
    for key, rx in (("method", rule.method), ("path", rule.path), ("host", rule.host)):
        if rx is not None:
            out[key] = rx.pattern
    if rule.headers:
        out["headers"] = [n if v is None else f"{n}: {v}" for n, v in rule.headers]
    if rule.header_matches:
        out["headerMatches"] = [
            {"name": m.name, "value": m.value, **({"mismatch": m.mismatch} if m.mismatch else {})}
            for m in rule.header_matches
        ]
    return out
