"""``toPorts[].serverNames``: the SNI patterns of a port rule, as Cilium reads them.

A pattern is a DNS name, matched case-insensitively with a trailing dot ignored (on both the
pattern and the SNI), or a name with one wildcard prefix:

- ``*.example.com``: exactly one label before ``example.com`` (``a.example.com``; not
  ``example.com``, not ``a.b.example.com``);
- ``**.example.com``: one or more labels (``a.example.com``, ``a.b.example.com``; not
  ``example.com``).

Anything else with a ``*`` (``a.*.com``, ``f*.example.com``, a bare ``*``), an empty name, an
empty label, a label over 63 characters or a name over 253, or a character outside letters,
digits, ``-`` and ``_``, is refused at load with the reason (:func:`parse_pattern`). Names on
the wire are ASCII (RFC 6066: IDNs as A-labels), so an SNI with any other byte matches nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_LABEL: Final = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
MAX_NAME: Final = 253


def parse_pattern(text: str) -> str:
    """The canonical form of a ``serverNames`` entry (lower case, no trailing dot).

    Raises ValueError saying what is wrong.
    """
    if not text:
        raise ValueError("empty server name is not allowed (as in Cilium)")
    name = text.lower()
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    rest = name
    if name.startswith("**."):
        rest = name[3:]
    elif name.startswith("*."):
        rest = name[2:]
    if "*" in rest:
        raise ValueError(
            f"{text!r}: a wildcard may only be a whole first label, '*.' (one label) or '**.' (any depth)"
        )
    if not rest:
        raise ValueError(f"{text!r}: a wildcard needs a domain after it")
    if len(rest) > MAX_NAME:
        raise ValueError(f"{text!r}: longer than {MAX_NAME} characters")
    for label in rest.split("."):
        if not label:
            raise ValueError(f"{text!r}: empty label")
        if not _LABEL.match(label):
            raise ValueError(
                f"{text!r}: label {label!r} must be 1-63 letters, digits, '-' or '_' "
                "(not starting or ending with '-'; IDNs in their xn-- form)"
            )
    return name


def normalize_sni(sni: str) -> str:
    """An SNI as patterns are matched against it: lower case (ASCII), one trailing dot dropped."""
    name = sni.lower() if sni.isascii() else sni
    return name[:-1] if name.endswith(".") else name


@dataclass(frozen=True, slots=True)
class ServerNames:
    """A port rule's ``serverNames``: canonical patterns, and lookups built from them."""

    patterns: tuple[str, ...]
    exact: frozenset[str]
    one_label: frozenset[str]  # the domains after "*."
    any_depth: tuple[str, ...]  # the domains after "**.", each with its leading dot

    @classmethod
    def build(cls, patterns: tuple[str, ...]) -> ServerNames:
        """From canonical patterns (:func:`parse_pattern`)."""
        exact = frozenset(p for p in patterns if not p.startswith("*"))
        one = frozenset(p[2:] for p in patterns if p.startswith("*.") and not p.startswith("**."))
        deep = tuple(p[2:] for p in patterns if p.startswith("**."))
        return cls(patterns, exact, one, deep)

    def matches(self, sni: str | None) -> bool:
        """Whether an SNI is allowed; no SNI (None) never is."""
        if not sni:
            return False
        name = normalize_sni(sni)
        if not name.isascii() or name.startswith(".") or ".." in name:
            return False  # not a host name: matches no pattern
        if name in self.exact:
            return True
        head, dot, parent = name.partition(".")
        if dot and head and parent in self.one_label:
            return True
        return any(
            name.endswith(d) and len(name) > len(d) and name[-len(d) - 1] != "." for d in self.any_depth
        )

    def __str__(self) -> str:
        return ", ".join(self.patterns)
