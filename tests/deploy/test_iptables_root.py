"""proxyd.iptables against a real kernel (root): inside a network namespace made by the test,
apply is atomic and idempotent, puts exactly the rendered rules in place, and remove restores the
nat table exactly as it was, leaving other software's rules alone."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from needs import need_root
from netns_support import netns, saved_rules, sh

from proxyd.iptables import IptablesError, Redirect, apply, read_nat, remove, render

pytestmark = pytest.mark.root

# Somebody else's nat rules (as Docker or kube-proxy would leave them) that proxyd must not touch.
FOREIGN = {
    4: "*nat\n:DOCKER - [0:0]\n"
    "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
    "-A OUTPUT -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 192.0.2.1:6443\n"
    "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n"
    "-A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80\nCOMMIT\n",
    6: "*nat\n-A POSTROUTING -s fd00:17::/64 -j MASQUERADE\nCOMMIT\n",
}

REDIRECTS = [
    Redirect(
        "mc",
        15001,
        (11211, 11212),
        "both",
        ("eth0",),
        ("10.0.0.0/8", "fd00::/8"),
        ("192.0.2.0/24",),
        True,
        True,
    ),
    Redirect("r2", 15002, (4000,), "outbound", (), (), ("2001:db8::/32",), False, True),
    Redirect("cass", 15003, (9042,), "inbound", (), (), (), True, False),
]


@pytest.fixture
def ns() -> Iterator[str]:
    need_root()
    if shutil.which("ip6tables-restore") is None:
        pytest.fail("ip6tables-restore missing next to iptables-restore")
    with netns() as name:
        yield name


def _ours(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("-A PROXYD_")]


@pytest.mark.parametrize("foreign", [True, False], ids=["with-foreign-rules", "empty-table"])
def test_apply_twice_then_remove_restores_exactly(ns: str, foreign: bool) -> None:
    if foreign:
        for fam, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            sh(tool, "--noflush", ns=ns, stdin=FOREIGN[fam])
    before = {fam: saved_rules(ns, fam) for fam in (4, 6)}

    for _ in range(2):
        apply(REDIRECTS, 4242, 0x10, ipv6=True, netns=ns)
        for fam in (4, 6):
            now = saved_rules(ns, fam)
            expected = [
                ln
                for ln in render(REDIRECTS, family=fam, uid=4242, mark=0x10).splitlines()
                if ln.startswith("-A ")
            ]
            assert _ours(now) == expected
            # exactly one jump each, first in its built-in chain
            assert [ln for ln in now if "-j PROXYD_" in ln and not ln.startswith("-A PROXYD_")] == [
                "-A PREROUTING -j PROXYD_PREROUTING",
                "-A OUTPUT -j PROXYD_OUTPUT",
            ]
            firsts = {
                c: next(ln for ln in now if ln.startswith(f"-A {c} ")) for c in ("PREROUTING", "OUTPUT")
            }
            assert firsts == {c: f"-A {c} -j PROXYD_{c}" for c in firsts}
            # every foreign rule is still there, in order
            rest = [ln for ln in now if "PROXYD_" not in ln]
            assert rest == [ln for ln in before[fam] if "PROXYD_" not in ln]

    remove(netns=ns)
    assert {fam: saved_rules(ns, fam) for fam in (4, 6)} == before
    remove(netns=ns)  # nothing installed: a no-op
    assert {fam: saved_rules(ns, fam) for fam in (4, 6)} == before


def test_reapply_replaces_rules_and_drops_stale_v6(ns: str) -> None:
    before6 = saved_rules(ns, 6)
    apply(REDIRECTS, None, 1, ipv6=True, netns=ns)
    smaller = [Redirect("cass", 15003, (9043,), "inbound")]
    apply(smaller, None, None, ipv6=False, netns=ns)
    assert _ours(saved_rules(ns, 4)) == [
        '-A PROXYD_PREROUTING -p tcp -m tcp --dport 9043 -m comment --comment "proxyd:cass" '
        "-j REDIRECT --to-ports 15003"
    ]
    assert saved_rules(ns, 6) == before6
    remove(netns=ns)


def test_duplicate_jumps_from_a_manual_run_are_cleaned(ns: str) -> None:
    text = render(REDIRECTS, family=4, uid=1, mark=None)
    sh("iptables-restore", "--noflush", ns=ns, stdin=text)
    sh("iptables-restore", "--noflush", ns=ns, stdin=text)
    assert read_nat(4, netns=ns).jump_counts() == {"PREROUTING": 2, "OUTPUT": 2}
    apply(REDIRECTS, 1, None, ipv6=False, netns=ns)
    assert read_nat(4, netns=ns).jump_counts() == {"PREROUTING": 1, "OUTPUT": 1}
    remove(netns=ns)
    assert not any("PROXYD" in ln for ln in saved_rules(ns, 4))


def test_failure_raises_with_stderr_and_changes_nothing(ns: str) -> None:
    before = saved_rules(ns, 4)
    with pytest.raises(IptablesError, match=r"(?i)cannot open network namespace|no such file"):
        apply(REDIRECTS, 1, None, ipv6=False, netns=ns + "-missing")
    # a restore that fails half-way (an unknown target) is rolled back whole
    from proxyd import iptables

    with pytest.raises(IptablesError, match="NO_SUCH_CHAIN"):
        iptables._restore(4, "*nat\n:PROXYD_OUTPUT - [0:0]\n-A PROXYD_OUTPUT -j NO_SUCH_CHAIN\nCOMMIT\n", ns)
    assert saved_rules(ns, 4) == before


def test_cli_apply_and_remove_in_a_namespace(ns: str) -> None:
    import argparse
    import io
    from types import SimpleNamespace

    from proxyd.iptables import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    red = SimpleNamespace(ports=(11211,), direction="outbound", interfaces=(), exclude_src=(), exclude_dst=())
    cfg = SimpleNamespace(
        listeners=[SimpleNamespace(name="mc", host="::", port=15001, redirect=red)], upstream_mark=9
    )
    before = {fam: saved_rules(ns, fam) for fam in (4, 6)}
    assert run(parser.parse_args(["--apply", "--uid", "root", "--netns", ns]), cfg, io.StringIO()) == 0  # type: ignore[arg-type]
    for fam in (4, 6):
        ours = _ours(saved_rules(ns, fam))
        assert any("--uid-owner 0" in r for r in ours)
        assert any("--mark 0x9" in r for r in ours)
    assert run(parser.parse_args(["--remove", "--netns", ns]), None, io.StringIO()) == 0
    assert {fam: saved_rules(ns, fam) for fam in (4, 6)} == before
