"""The few exception classes proxyd raises, named for whose fault it was.

- :class:`ConfigError` / :class:`PolicyError`: the operator wrote something invalid; each carries
  every problem found as ``file:line: key: problem`` so a whole file is reported at once.
- :class:`RuleError` / :class:`ParserConfigError`: a parser rejected its part of a policy or
  config; the loader adds file, line and key and re-raises as one of the above.
- :class:`PeerError`: the network or a peer misbehaved (connect refused, reset, timeout).
"""

from __future__ import annotations

from collections.abc import Iterable


class ProxydError(Exception):
    """Base of proxyd's own exceptions."""


class ProblemsError(ProxydError):
    """A validation failure carrying one formatted line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(ProblemsError):
    """The daemon configuration is invalid."""


class PolicyError(ProblemsError):
    """A policy document is invalid."""


class RuleError(ProxydError):
    """A parser's rule compiler rejected an ``l7`` rule (message without location)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


class ParserConfigError(ProxydError):
    """A parser factory rejected its ``parser_config`` (message without location)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


class PeerError(ProxydError):
    """A network peer failed: refused, reset or timed out."""
