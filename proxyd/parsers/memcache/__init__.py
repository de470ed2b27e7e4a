"""memcache: the memcached text, meta and binary protocols, with command and key policy.

Package layout (each piece readable and testable alone):

- :mod:`.parser`: protocol detection from the first client byte, the factory;
- :mod:`.text`: classic text commands and meta commands (``mg ms md ma mn me``);
- :mod:`.binary`: the binary protocol, quiet opcodes included;
- :mod:`.common`: limits, the pending-reply queue and how denials are placed in the reply stream;
- :mod:`.rules`: the parsed request and the ``l7`` rule matchers (``command``, ``keyExact``,
  ``keyPrefix``, ``keyRegex``).

Example policy (the Cilium memcached guide's, completed)::

    toPorts:
      - ports: [{port: "11211", protocol: TCP}]
        rules:
          l7proto: memcache
          l7:
            - command: writeGroup
              keyPrefix: "alliance/fleet/"
            - command: get
              keyPrefix: "alliance/fleet/"

A denied request is dropped and answered in its place in the reply stream:
``CLIENT_ERROR access denied\\r\\n`` (text and meta; nothing for ``noreply``), or a binary
response with the request's opcode and opaque, status 0x0008 and body ``access denied``.
See ``docs/parsers/memcache.md`` for the full behaviour.
"""

from __future__ import annotations

from .parser import MemcacheFactory, MemcacheParser
from .rules import MemcacheRequest, MemcacheRule, compile_rule

__all__ = ["MemcacheFactory", "MemcacheParser", "MemcacheRequest", "MemcacheRule", "compile_rule"]
