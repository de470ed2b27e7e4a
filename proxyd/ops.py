"""Verdicts a parser answers with: proxylib's op codes (see docs/parser-api.md).

A verdict is a plain ``(Op, n)`` tuple rather than an object: parsers return one per
frame on the hot path, and a tuple costs nothing to build or unpack.
"""

from __future__ import annotations

import enum


class Op(enum.IntEnum):
    """What the framework should do with the bytes at the head of one direction."""

    MORE = 1  # n > 0: call again once at least n more bytes are buffered
    PASS = 2  # n > 0: forward n bytes (may reach past what is buffered)
    DROP = 3  # n > 0: discard n bytes (may reach past what is buffered)
    INJECT = 4  # n > 0: send n bytes queued with ``inject()`` for this direction, here
    ERROR = 5  # n > 0: protocol error code; the connection is closed
    NOP = 6  # nothing to do with this input; wait for more


Verdict = tuple[Op, int]

MORE = Op.MORE
PASS = Op.PASS
DROP = Op.DROP
INJECT = Op.INJECT
ERROR = Op.ERROR
NOP = Op.NOP

NOP_VERDICT: Verdict = (Op.NOP, 0)

# Error codes a parser may answer ERROR with; any positive integer is allowed, these are
# the ones the framework itself names in access logs.
ERROR_INVALID_FRAME_TYPE = 1
ERROR_INVALID_FRAME_LENGTH = 2
ERROR_UNSUPPORTED = 3
ERROR_PROTOCOL = 4

ERROR_NAMES = {
    ERROR_INVALID_FRAME_TYPE: "invalid frame type",
    ERROR_INVALID_FRAME_LENGTH: "invalid frame length",
    ERROR_UNSUPPORTED: "unsupported",
    ERROR_PROTOCOL: "protocol error",
}
