"""Request-target path normalisation: the path the rules judge is the path the server serves.

Why
---

A rule ``path: "/api/.*"`` is written about what the server serves, but servers do not serve
the bytes they were sent: nginx resolves ``/api/../index.html`` to ``/index.html``, merges
``//``, and decodes ``%2e`` and ``%2F``. A proxy that matched the target as sent would allow
``/api/../secret``. Cilium's Envoy therefore normalises the path before its rules match and
forwards the normalised path (Cilium's default, agent flag ``--http-normalize-path=true``, sets
the HTTP connection manager's ``normalize_path``, ``merge_slashes`` and
``path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT``). proxyd does the same, in the same
order as Envoy's ``ConnectionManagerUtility::maybeNormalizePath``:

1. escaped slashes (``%2F``, ``%5C``, any case) in the path, per ``escaped_slashes``:
   ``KEEP_UNCHANGED`` leaves them, ``REJECT_REQUEST`` answers 400, ``UNESCAPE_AND_FORWARD``
   decodes them (to ``/`` and ``\\``) and goes on, ``UNESCAPE_AND_REDIRECT`` decodes them and,
   once the rest is done, answers ``307`` with the normalised path in ``Location`` (the client
   asks again, for the path the server will see);
2. ``normalize_path`` (RFC 3986 section 6.2.2 and 5.2.4, as Envoy's canonicaliser does it):
   a backslash is a slash; a percent-escape of an unreserved character (``A-Z a-z 0-9 - . _ ~``)
   is decoded; other escapes are kept, their hex digits upper-cased (section 6.2.2.1; Envoy keeps
   the case as sent); ``.`` and ``..`` segments (``%2e`` included) are removed, ``..`` at the
   root staying at the root (``/../a`` is ``/a``, as RFC 3986 and Envoy have it);
3. ``merge_slashes``: runs of ``/`` become one.

The query (from the first ``?``) is never touched. What cannot be normalised without guessing
is refused with 400, where Envoy also refuses or where servers disagree: a fragment (``#``, which
RFC 9112 does not allow in a request-target; Envoy refuses it), a ``%`` not followed by two hex
digits (Envoy passes it through, nginx answers 400; decoding around it is ambiguous), and
``%00`` (Envoy and nginx refuse it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: ``path_with_escaped_slashes_action`` values, as Envoy names them.
KEEP_UNCHANGED: Final = "KEEP_UNCHANGED"
REJECT_REQUEST: Final = "REJECT_REQUEST"
UNESCAPE_AND_REDIRECT: Final = "UNESCAPE_AND_REDIRECT"
UNESCAPE_AND_FORWARD: Final = "UNESCAPE_AND_FORWARD"
ESCAPED_SLASHES_ACTIONS: Final = (KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_REDIRECT, UNESCAPE_AND_FORWARD)

#: What :func:`normalize` decided.
CONTINUE: Final = 0  # judge and forward ``path``
REDIRECT: Final = 1  # answer 307 with ``Location: path``
REJECT: Final = 2  # answer 400; ``reason`` says why

_ESCAPED_SLASH: Final = re.compile(r"%(?:2[fF]|5[cC])")
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES: Final = re.compile(r"//+")
_DOT_SEGMENT: Final = re.compile(r"/\.\.?(?:/|$)")
#: What every step needs to find in a target to change or refuse it; a target without any of
#: these is already normal (the common case, kept to one regex search per request).
SUSPECT: Final = re.compile(r"[#%\\]|/\.|//")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass(frozen=True, slots=True)
class PathOptions:
    """The ``parser_config`` keys that shape normalisation (defaults: Cilium's)."""

    normalize_path: bool = True
    merge_slashes: bool = True
    escaped_slashes: str = UNESCAPE_AND_REDIRECT

    @property
    def active(self) -> bool:
        return self.normalize_path or self.merge_slashes or self.escaped_slashes != KEEP_UNCHANGED


@dataclass(frozen=True, slots=True)
class Normalized:
    action: int  # CONTINUE | REDIRECT | REJECT
    path: str  # the normalised path and query (CONTINUE, REDIRECT)
    reason: str = ""  # why it was refused (REJECT)


def _escape(m: re.Match[str]) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else "%" + m.group(1).upper()


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 on an absolute path (``/`` first); ``..`` never climbs above ``/``."""
    out: list[str] = []
    segments = path[1:].split("/")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def normalize(target_path: str, opts: PathOptions) -> Normalized:
    """Normalise an origin-form path and query (``/a/../b?q``) per ``opts``; see the module doc."""
    if "#" in target_path:
        return Normalized(REJECT, target_path, "fragment (#) in the request target")
    q = target_path.find("?")
    path, query = (target_path, "") if q < 0 else (target_path[:q], target_path[q:])
    if "%" in path:
        if _BAD_PERCENT.search(path) is not None:
            return Normalized(REJECT, target_path, "malformed percent-encoding in the path")
        if "%00" in path:
            return Normalized(REJECT, target_path, "NUL (%00) in the path")
    redirect = False
    action = opts.escaped_slashes
    if action != KEEP_UNCHANGED and "%" in path and _ESCAPED_SLASH.search(path) is not None:
        if action == REJECT_REQUEST:
            return Normalized(REJECT, target_path, "escaped slash (%2F or %5C) in the path")
        path = path.replace("%2F", "/").replace("%2f", "/").replace("%5C", "\\").replace("%5c", "\\")
        redirect = action == UNESCAPE_AND_REDIRECT
    if opts.normalize_path:
        if "\\" in path:
            path = path.replace("\\", "/")
        if "%" in path:
            path = _ESCAPE.sub(_escape, path)
        if "/." in path and _DOT_SEGMENT.search(path) is not None:
            path = remove_dot_segments(path)
    if opts.merge_slashes and "//" in path:
        path = _SLASHES.sub("/", path)
    return Normalized(REDIRECT if redirect else CONTINUE, path + query)
