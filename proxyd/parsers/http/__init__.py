"""http: HTTP/1.1 and 1.0 with Cilium's ``rules.http`` policy, framed strictly per RFC 9112.

Package layout (each piece readable and testable alone):

- :mod:`.framing`: the head reader, request and response framing (RFC 9112 sections 2-7);
- :mod:`.rules`: the request policy sees and the ``rules.http`` matchers;
- :mod:`.parser`: the per-connection parser (theory of operation in its docstring).

Example policy (written as Cilium's ``toPorts[].rules.http``)::

    toPorts:
      - ports: [{port: "80", protocol: TCP}]
        rules:
          http:
            - method: GET
              path: "/public/.*"
            - method: PUT
              path: "/uploads/[a-z0-9]+"
              headers: ["X-Upload-Token"]

A denied request is dropped (head and body) and answered in its place among the responses:
``HTTP/1.1 403 Forbidden`` with body ``Access denied``. See ``docs/parsers/http.md``.

``parser_config`` keys: ``max_header_bytes`` (default 65536), ``log_responses`` (true), and
the path normalisation keys of :mod:`.normalize`: ``normalize_path`` (true), ``merge_slashes``
(true), ``path_with_escaped_slashes_action`` (``UNESCAPE_AND_REDIRECT``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, cast

from proxyd.native import native_module, parser_twins
from proxyd.parser import ConnectionContext, EntryType, Parser, ParserFactory, RuleMatcher
from proxyd.policy.flat import hand_over

from . import parser as _parser
from .parser import HttpConfig, HttpParser, validate_config
from .rules import RULE_KEYS, HttpRequest, HttpRule, compile_rule

_native = native_module()
if _native is not None:
    _native.setup_http(
        HttpRequest=HttpRequest,
        REQUEST=EntryType.REQUEST,
        RESPONSE=EntryType.RESPONSE,
    )
    # The native twin evaluates a connection's rules.http itself when it can, reading only the
    # flattened-policy interface (proxyd.policy.flat: HttpRule.flat gives its conditions;
    # proxyd/_native_src/policy.c, http_rules.c).
    hand_over(_native)


class HttpFactory(ParserFactory):
    """Creates :class:`HttpParser` instances and compiles ``rules.http`` entries."""

    name = "http"
    rule_keys = RULE_KEYS
    description = "HTTP/1.1 and 1.0 (Cilium rules.http: method, path, host, headers, headerMatches)"

    def validate_config(self, config: Mapping[str, Any]) -> HttpConfig:
        return validate_config(config)

    def compile_rule(self, rule: Mapping[str, Any]) -> RuleMatcher:
        return compile_rule(rule)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        cfg = config if isinstance(config, HttpConfig) else HttpConfig()
        # Response entries the access-log mode discards are not built at all (as memcache).
        if cfg.log_responses and not bool(getattr(ctx, "logs_responses", True)):
            cfg = _quiet_responses(cfg)
        twins = parser_twins(ctx)
        if twins is not None:
            # The native engine runs (or a test asked for it): the compiled twin, which hands
            # the states it does not handle to the reference parser and takes them back. The
            # reference is made on the first hand-over, which most connections never reach.
            return cast(
                Parser,
                twins.Http(
                    ctx,
                    (HttpParser, ctx, cfg),
                    cfg.max_header_bytes,
                    cfg.log_responses,
                    _normalizing(cfg),
                    _parser.PENDING_BUDGET,
                ),
            )
        return HttpParser(ctx, cfg)


@functools.lru_cache(maxsize=64)
def _quiet_responses(cfg: HttpConfig) -> HttpConfig:
    """``cfg`` without response entries (one copy per config, not one per connection)."""
    return dataclasses.replace(cfg, log_responses=False)


@functools.lru_cache(maxsize=64)
def _normalizing(cfg: HttpConfig) -> bool:
    """Whether ``cfg``'s path normalisation changes anything (HttpParser.normalizing)."""
    return _parser.path_options(cfg).active


__all__ = ["HttpConfig", "HttpFactory", "HttpParser", "HttpRequest", "HttpRule"]
