"""proxyd.iptables rendering: what each listener's redirect block becomes, per family, direction,
exclusion and loop guard. Pure string tables; the root tests apply the same output to a kernel."""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass

import pytest

from proxyd.iptables import (
    IptablesError,
    Redirect,
    add_arguments,
    families_of,
    parse_nat,
    redirects_from_listeners,
    render,
    render_remove,
    resolve_uid,
    run,
)

C = '-m comment --comment "proxyd:mc"'


def mc(**kw: object) -> Redirect:
    base: dict[str, object] = {"listener": "mc", "to_port": 15001, "ports": (11211,), "direction": "inbound"}
    base.update(kw)
    return Redirect(**base)  # type: ignore[arg-type]


def rules(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("-A ")]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", (True, False)),
        ("10.1.2.3", (True, False)),
        ("::", (True, True)),
        ("[::]", (True, True)),
        ("::1", (False, True)),
        ("fd00::2", (False, True)),
    ],
)
def test_families_of_listener_address(host: str, expected: tuple[bool, bool]) -> None:
    assert families_of(host) == expected


def test_inbound_v4_full_text() -> None:
    assert render([mc()], family=4, uid=None, mark=None) == (
        "*nat\n"
        ":PROXYD_OUTPUT - [0:0]\n"
        ":PROXYD_PREROUTING - [0:0]\n"
        f"-A PROXYD_PREROUTING -p tcp -m tcp --dport 11211 {C} -j REDIRECT --to-ports 15001\n"
        "-I PREROUTING 1 -j PROXYD_PREROUTING\n"
        "-I OUTPUT 1 -j PROXYD_OUTPUT\n"
        "COMMIT\n"
    )


def test_v4_only_listener_renders_nothing_for_v6() -> None:
    assert rules(render([mc()], family=6, uid=None, mark=None)) == []


def test_outbound_v6_with_uid_and_mark() -> None:
    r = mc(direction="outbound", ipv4=False, ipv6=True)
    assert rules(render([r], family=4, uid=999, mark=1)) == []
    assert rules(render([r], family=6, uid=999, mark=0x1F)) == [
        f"-A PROXYD_OUTPUT -d ::1/128 -p tcp -m tcp --dport 11211 {C} -j RETURN",
        f"-A PROXYD_OUTPUT -p tcp -m tcp --dport 11211 -m owner --uid-owner 999 {C} -j RETURN",
        f"-A PROXYD_OUTPUT -p tcp -m tcp --dport 11211 -m mark --mark 0x1f {C} -j RETURN",
        f"-A PROXYD_OUTPUT -p tcp -m tcp --dport 11211 {C} -j REDIRECT --to-ports 15001",
    ]


@pytest.mark.parametrize(
    ("uid", "mark", "guard"),
    [
        (1000, None, "-m owner --uid-owner 1000"),
        (None, 7, "-m mark --mark 0x7"),
        (0, None, "-m owner --uid-owner 0"),
    ],
)
def test_outbound_loop_guard_by_uid_or_mark(uid: int | None, mark: int | None, guard: str) -> None:
    out = rules(render([mc(direction="outbound")], family=4, uid=uid, mark=mark))
    assert out == [
        f"-A PROXYD_OUTPUT -d 127.0.0.0/8 -p tcp -m tcp --dport 11211 {C} -j RETURN",
        f"-A PROXYD_OUTPUT -p tcp -m tcp --dport 11211 {guard} {C} -j RETURN",
        f"-A PROXYD_OUTPUT -p tcp -m tcp --dport 11211 {C} -j REDIRECT --to-ports 15001",
    ]


def test_outbound_without_loop_guard_is_refused() -> None:
    with pytest.raises(IptablesError, match="loop"):
        render([mc(direction="both")], family=4, uid=None, mark=None)


def test_inbound_needs_no_loop_guard_and_uid_only_touches_output() -> None:
    out = rules(render([mc()], family=4, uid=5, mark=None))
    assert all(r.startswith("-A PROXYD_PREROUTING") for r in out)


def test_both_directions_two_ports_interfaces_and_mixed_family_excludes() -> None:
    r = mc(
        ports=(11211, 11212),
        direction="both",
        interfaces=("eth0", "eth1"),
        ipv6=True,
        exclude_src=("10.0.0.0/8", "fd00::/8"),
        exclude_dst=("192.168.1.7/32",),
    )
    v4 = rules(render([r], family=4, uid=None, mark=3))
    pre = [x for x in v4 if x.startswith("-A PROXYD_PREROUTING")]
    assert pre == [
        f"-A PROXYD_PREROUTING -s 10.0.0.0/8 -p tcp -m tcp --dport 11211 {C} -j RETURN",
        f"-A PROXYD_PREROUTING -d 192.168.1.7/32 -p tcp -m tcp --dport 11211 {C} -j RETURN",
        f"-A PROXYD_PREROUTING -i eth0 -p tcp -m tcp --dport 11211 {C} -j REDIRECT --to-ports 15001",
        f"-A PROXYD_PREROUTING -i eth1 -p tcp -m tcp --dport 11211 {C} -j REDIRECT --to-ports 15001",
        f"-A PROXYD_PREROUTING -s 10.0.0.0/8 -p tcp -m tcp --dport 11212 {C} -j RETURN",
        f"-A PROXYD_PREROUTING -d 192.168.1.7/32 -p tcp -m tcp --dport 11212 {C} -j RETURN",
        f"-A PROXYD_PREROUTING -i eth0 -p tcp -m tcp --dport 11212 {C} -j REDIRECT --to-ports 15001",
        f"-A PROXYD_PREROUTING -i eth1 -p tcp -m tcp --dport 11212 {C} -j REDIRECT --to-ports 15001",
    ]
    out = [x for x in v4 if x.startswith("-A PROXYD_OUTPUT")]
    assert len(out) == 2 * 5  # loopback, mark, src, dst, redirect (no -i on OUTPUT)
    assert not any(" -i " in x for x in out)
    v6 = rules(render([r], family=6, uid=None, mark=3))
    assert f"-A PROXYD_PREROUTING -s fd00::/8 -p tcp -m tcp --dport 11211 {C} -j RETURN" in v6
    assert not any("10.0.0.0" in x or "192.168" in x for x in v6)
    assert not any("-d " in x for x in v6 if x.startswith("-A PROXYD_PREROUTING"))


def test_cidr_is_normalised_like_iptables_save() -> None:
    out = rules(render([mc(exclude_src=("10.1.2.3/8",))], family=4, uid=None, mark=None))
    assert out[0].startswith("-A PROXYD_PREROUTING -s 10.0.0.0/8 ")


def test_comment_is_sanitised() -> None:
    out = rules(render([mc(listener='a "b";c')], family=4, uid=None, mark=None))
    assert '--comment "proxyd:a__b__c"' in out[0]


@pytest.mark.parametrize(
    ("existing", "jump_lines"),
    [
        (
            {"PREROUTING": 0, "OUTPUT": 0},
            ["-I PREROUTING 1 -j PROXYD_PREROUTING", "-I OUTPUT 1 -j PROXYD_OUTPUT"],
        ),
        ({"PREROUTING": 1, "OUTPUT": 1}, []),
        (
            {"PREROUTING": 3, "OUTPUT": 0},
            ["-D PREROUTING -j PROXYD_PREROUTING"] * 2 + ["-I OUTPUT 1 -j PROXYD_OUTPUT"],
        ),
    ],
)
def test_jumps_are_made_idempotent(existing: dict[str, int], jump_lines: list[str]) -> None:
    text = render([mc()], family=4, uid=None, mark=None, existing_jumps=existing)
    assert [ln for ln in text.splitlines() if ln.startswith(("-I ", "-D "))] == jump_lines


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"direction": "sideways"}, "direction"),
        ({"ports": ()}, "at least one port"),
        ({"ports": (0,)}, "out of range"),
        ({"ports": (15001,)}, "own port"),
        ({"ports": (1, 1)}, "duplicate"),
        ({"interfaces": ("eth0",), "direction": "outbound"}, "inbound traffic only"),
        ({"interfaces": ("bad name",)}, "interface name"),
        ({"exclude_src": ("10.0.0.0/33",)}, "bad CIDR"),
        ({"ipv4": False}, "neither"),
    ],
)
def test_bad_redirects_are_rejected(kw: dict[str, object], match: str) -> None:
    with pytest.raises(IptablesError, match=match):
        mc(**kw)


@pytest.mark.parametrize(("uid", "mark"), [(-1, None), (None, 0), (None, 2**32)])
def test_bad_uid_or_mark(uid: int | None, mark: int | None) -> None:
    with pytest.raises(IptablesError):
        render([mc(direction="outbound")], family=4, uid=uid, mark=mark)


def test_two_listeners_on_one_port_and_direction_conflict() -> None:
    with pytest.raises(IptablesError, match="both redirect port 11211"):
        render([mc(), mc(listener="other", to_port=15002, direction="both")], family=4, uid=1, mark=None)
    # the same port in different directions is fine
    render([mc(), mc(listener="other", to_port=15002, direction="outbound")], family=4, uid=1, mark=None)


SAVED = """# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j PROXYD_NOT_NAT
COMMIT
*nat
:PREROUTING ACCEPT [3:180]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:PROXYD_OUTPUT - [0:0]
:PROXYD_PREROUTING - [0:0]
-A PREROUTING -j PROXYD_PREROUTING
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -j PROXYD_OUTPUT
-A OUTPUT -p tcp -j PROXYD_OUTPUT
-A DOCKER -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.2:80
-A PROXYD_PREROUTING -p tcp -m tcp --dport 1 -j REDIRECT --to-ports 2
COMMIT
"""


def test_parse_nat_and_remove_input() -> None:
    state = parse_nat(SAVED)
    assert state.chains == ("PREROUTING", "OUTPUT", "DOCKER", "PROXYD_OUTPUT", "PROXYD_PREROUTING")
    assert state.jump_counts() == {"PREROUTING": 1, "OUTPUT": 1}
    assert render_remove(state) == (
        "*nat\n"
        "-D PREROUTING -j PROXYD_PREROUTING\n"
        "-D OUTPUT -j PROXYD_OUTPUT\n"
        "-D OUTPUT -p tcp -j PROXYD_OUTPUT\n"
        "-F PROXYD_OUTPUT\n-F PROXYD_PREROUTING\n-X PROXYD_OUTPUT\n-X PROXYD_PREROUTING\n"
        "COMMIT\n"
    )
    assert (
        render_remove(parse_nat("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j DOCKER\nCOMMIT\n")) is None
    )


@dataclass(frozen=True)
class _Red:
    ports: tuple[int, ...]
    direction: str = "inbound"
    interfaces: tuple[str, ...] = ()
    exclude_src: tuple[str, ...] = ()
    exclude_dst: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Lis:
    name: str
    host: str
    port: int
    redirect: _Red | None


@dataclass(frozen=True)
class _Cfg:
    listeners: tuple[_Lis, ...]
    upstream_mark: int | None = None


def test_redirects_from_listeners() -> None:
    got = redirects_from_listeners(
        [
            _Lis("a", "0.0.0.0", 15001, _Red((11211,))),
            _Lis("b", "::", 15002, _Red((6379,), "outbound", exclude_dst=("fd00::/8",))),
            _Lis("c", "fd00::1", 15003, _Red((9042,))),
            _Lis("d", "127.0.0.1", 15004, None),
        ]
    )
    assert [(r.listener, r.to_port, r.ports, r.ipv4, r.ipv6) for r in got] == [
        ("a", 15001, (11211,), True, False),
        ("b", 15002, (6379,), True, True),
        ("c", 15003, (9042,), False, True),
    ]
    with pytest.raises(IptablesError, match="both redirect"):
        redirects_from_listeners([_Lis("a", "0.0.0.0", 1, _Red((5,))), _Lis("b", "0.0.0.0", 2, _Red((5,)))])


def test_real_config_loader_feeds_redirects(tmp_path: object) -> None:
    from pathlib import Path

    from proxyd import config

    path = Path(str(tmp_path)) / "proxyd.yaml"
    path.write_text(
        "upstream_mark: 1\n"
        "listeners:\n"
        "  - name: r2\n    address: '[::]:15001'\n    l7proto: r2d2\n"
        "    redirect:\n      ports: [4000, '4001']\n      direction: both\n"
        "      interfaces: []\n      exclude_src: ['10.0.0.0/8', 'fd00::/8']\n"
    )
    cfg = config.load_config(path)
    (r,) = redirects_from_listeners(cfg.listeners)
    assert r == Redirect("r2", 15001, (4000, 4001), "both", (), ("10.0.0.0/8", "fd00::/8"), (), True, True)
    assert cfg.upstream_mark == 1


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_prints_both_families_and_takes_mark_from_config() -> None:
    cfg = _Cfg((_Lis("mc", "::", 15001, _Red((11211,), "outbound")),), upstream_mark=0x10)
    out = io.StringIO()
    assert run(_args(), cfg, out) == 0
    text = out.getvalue()
    assert text.count("*nat") == 2
    assert "# IPv6: ip6tables-restore -w --noflush" in text
    assert "-m mark --mark 0x10" in text
    out = io.StringIO()
    run(_args("--mark", "0x20", "--uid", "0"), cfg, out)
    assert "-m mark --mark 0x20" in out.getvalue()
    assert "--uid-owner 0" in out.getvalue()


def test_cli_errors() -> None:
    with pytest.raises(IptablesError, match="--config is required"):
        run(_args("--apply"), None, io.StringIO())
    cfg = _Cfg((_Lis("mc", "0.0.0.0", 15001, _Red((11211,), "outbound")),))
    with pytest.raises(IptablesError, match="loop"):
        run(_args(), cfg, io.StringIO())
    with pytest.raises(SystemExit):
        _args("--apply", "--remove")


def test_resolve_uid() -> None:
    assert resolve_uid("0") == 0
    assert resolve_uid("root") == 0
    with pytest.raises(IptablesError, match="no such user"):
        resolve_uid("no-such-user-proxyd-test")
