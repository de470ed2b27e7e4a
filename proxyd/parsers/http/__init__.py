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

from collections.abc import Mapping
from typing import Any

from proxyd.parser import ConnectionContext, Parser, ParserFactory, RuleMatcher

from .parser import HttpConfig, HttpParser, validate_config
from .rules import RULE_KEYS, HttpRequest, HttpRule, compile_rule


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
        return HttpParser(ctx, config if isinstance(config, HttpConfig) else HttpConfig())


__all__ = ["HttpConfig", "HttpFactory", "HttpParser", "HttpRequest", "HttpRule"]
