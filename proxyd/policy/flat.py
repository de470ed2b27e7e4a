"""The flattened-policy interface: what a compiled parser may read of a connection's policy.

The native memcache parser (``proxyd/_native_src/policy.c``) evaluates a connection's rules in C
instead of calling ``ctx.matches`` (five Python frames a request). It does that only through
the objects this module hands over and the attributes docs/native.md lists for
:data:`VERSION`; nothing else of the policy package or the context is read by name. A parser
calls :func:`hand_over` once, so it imports this interface and the parser API, not the context
or the policy internals. Changing any listed attribute means a new :data:`VERSION`; the
compiled module refuses a version it was not built for.
"""

from __future__ import annotations

from typing import Any

from proxyd.context import ALLOWED, Context
from proxyd.parser import ALLOW_ALL
from proxyd.policy import regex
from proxyd.policy.store import LiveConnectionPolicy

#: The interface version docs/native.md describes; the C side checks it (FLAT_POLICY_VERSION).
VERSION = 1


def hand_over(native: Any) -> None:
    """Give the compiled module ``native`` the types it flattens a connection's policy with."""
    native.setup_policy(
        version=VERSION,
        LiveConnectionPolicy=LiveConnectionPolicy,
        RuleRegex=regex.RuleRegex,
        ALLOW_ALL=ALLOW_ALL,
        unanchored=regex._UNANCHORED,
        Context=Context,
        ALLOWED=ALLOWED,
    )
