"""Shared helpers for the http parser tests: run one exchange through the harness."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxyd.parsers.http import HttpFactory
from proxyd.parsers.http.parser import BAD_REQUEST, DENIED, DENIED_CLOSE, TOO_LARGE
from proxyd.testing import Harness

__all__ = ["BAD_REQUEST", "DENIED", "DENIED_CLOSE", "TOO_LARGE", "Outcome", "run", "splits"]


@dataclass(frozen=True)
class Outcome:
    to_server: bytes
    to_client: bytes
    closed: bool
    errors: tuple[str, ...]  # "error" fields of the log, in order


def splits(data: bytes, every_cut: bool = True) -> list[Any]:
    """The segmentations a table row is fed in: whole, byte by byte, random, every cut in two."""
    out: list[Any] = [None, "bytes", "random"]
    if every_cut:
        out += [[i] for i in range(1, len(data))]
    return out


def run(
    requests: bytes,
    responses: Sequence[bytes] = (),
    *,
    rules: Sequence[Mapping[str, Any]] | None = None,
    parser_config: Mapping[str, Any] | None = None,
    split: Any = None,
    seed: int = 0,
    client_eof: bool = False,
) -> Outcome:
    """Feed ``requests`` (client side), then each of ``responses`` (server side) in turn."""
    h = Harness(HttpFactory(), rules=rules, parser_config=parser_config)
    h.feed(requests, split=split, seed=seed)
    for resp in responses:
        h.feed(resp, reply=True, split=split, seed=seed)
    if client_eof:
        h.eof(False)
    errors = tuple(str(e.fields["error"]) for e in h.log if "error" in e.fields)
    return Outcome(h.to_server, h.to_client, h.closed, errors)
