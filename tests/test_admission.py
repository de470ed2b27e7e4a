"""Admission (proxyd/admission.py): every refusal, in its order, from the facts alone.

The end-to-end counterparts (a real redirected connection, a real loop, a real policy) are in
test_daemon.py, test_harden.py and test_e2e_policy.py; these pin the decision itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxyd.admission import ADMIT, AUDIT, READ_HELLO, Address, Refuse, admit, by_policy

LOCAL = ("10.0.0.1", 15001)
SRC = ("10.0.0.9", 40000)
ODST = ("10.0.0.2", 11211)


class Facts:
    """What the listener would pass, recording which questions admission asked."""

    def __init__(self, listeners: set[Address] | None = None, admitted: int = 0) -> None:
        self.listeners = listeners or set()
        self.count = admitted
        self.asked: list[str] = []

    def is_listener(self, addr: Address, local_ip: str) -> bool:
        self.asked.append(f"is_listener {addr} {local_ip}")
        return addr in self.listeners

    def admitted(self) -> int:
        self.asked.append("admitted")
        return self.count


def _admit(
    facts: Facts,
    fixed: Address | None = None,
    odst: Address | None = ODST,
    locals_: dict[Address, Address] | None = None,
    max_connections: int = 10,
) -> tuple[Address, Refuse | None]:
    return admit(fixed, LOCAL, SRC, odst, facts.is_listener, locals_ or {}, facts.admitted, max_connections)


def test_a_redirected_connection_goes_to_its_original_destination() -> None:
    facts = Facts()
    assert _admit(facts) == (ODST, None)
    assert facts.asked == [f"is_listener {ODST} {LOCAL[0]}", "admitted"]


def test_a_fixed_upstream_reads_no_original_destination_and_checks_no_loop() -> None:
    facts = Facts(listeners={ODST})
    fixed = ("192.0.2.7", 6379)
    assert _admit(facts, fixed=fixed, odst=None, locals_={SRC: fixed}) == (fixed, None)
    assert facts.asked == ["admitted"]


def test_no_original_destination_is_not_redirected() -> None:
    facts = Facts()
    assert _admit(facts, odst=None) == (LOCAL, Refuse("not redirected: no original destination"))
    assert facts.asked == []  # the count is not asked for a connection refused anyway


def test_the_listener_itself_as_original_destination_is_not_redirected() -> None:
    facts = Facts()
    refused = Refuse("not redirected: original destination is the listener itself")
    assert _admit(facts, odst=LOCAL) == (LOCAL, refused)


def test_an_original_destination_on_a_proxyd_listener_is_a_loop() -> None:
    facts = Facts(listeners={ODST})
    upstream, refused = _admit(facts)
    assert upstream == ODST
    assert refused == Refuse("loop: original destination 10.0.0.2:11211 is a proxyd listener")


def test_proxyds_own_upstream_connection_sent_back_is_a_loop() -> None:
    facts = Facts()
    _, refused = _admit(facts, locals_={SRC: ODST})
    assert refused == Refuse("loop: this is proxyd's own upstream connection, redirected back to it")
    # The same local address connecting elsewhere is someone else's connection.
    assert _admit(Facts(), locals_={SRC: ("10.0.0.3", 1)}) == (ODST, None)


@pytest.mark.parametrize(("count", "refused"), [(10, False), (11, True)])
def test_max_connections_counts_this_connection_too(count: int, refused: bool) -> None:
    """The count includes the connection being admitted: the 11th of 10 is refused."""
    _, why = _admit(Facts(admitted=count), max_connections=10)
    assert why == (Refuse("max_connections (10) reached") if refused else None)


def test_a_redirect_refusal_comes_before_the_limit() -> None:
    facts = Facts(listeners={ODST}, admitted=99)
    _, refused = _admit(facts)
    assert refused is not None and refused.reason.startswith("loop:")
    assert "admitted" not in facts.asked


@dataclass(frozen=True)
class L4:
    l4_allowed: bool = True
    l4_reason: str = "allowed by p"
    audit_l4: bool = False
    reads_hello: bool = False


def test_by_policy() -> None:
    assert by_policy(L4()) == ADMIT
    denied = L4(l4_allowed=False, l4_reason="no rule allows it")
    assert by_policy(denied) == Refuse("policy: no rule allows it")
    assert by_policy(L4(audit_l4=True)) == AUDIT
    # A serverNames rule could apply: the ClientHello decides, whatever the rest says.
    assert by_policy(L4(l4_allowed=False, reads_hello=True)) == READ_HELLO
