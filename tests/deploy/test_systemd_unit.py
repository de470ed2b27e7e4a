"""systemd/proxyd.service: ``systemd-analyze verify`` with no output at all (it exits 0 on parse
warnings, so anything on stderr fails), plus the settings the deployment depends on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from needs import need_binary

from proxyd.config import Limits
from proxyd.fdbudget import FdBudget
from proxyd.server import FD_BASE, FDS_PER_CONNECTION

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "proxyd.service"
PROXYD = "/usr/local/bin/proxyd"


def entries() -> dict[str, list[str]]:
    """Key -> values in order (systemd allows repeated keys), across sections."""
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m.group(2)]


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    need_binary("systemd-analyze")
    # verify checks that every Exec binary exists: point the proxyd path at an executable that
    # does (the installed console script when there is one, else a stand-in).
    exe = shutil.which("proxyd")
    if exe is None:
        stand_in = tmp_path / "proxyd"
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
        exe = str(stand_in)
    unit = tmp_path / "proxyd.service"
    unit.write_text(UNIT.read_text().replace(PROXYD, exe))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout == "", proc.stdout


def test_verify_would_catch_a_bad_unit(tmp_path: Path) -> None:
    need_binary("systemd-analyze")
    unit = tmp_path / "proxyd.service"
    unit.write_text("[Service]\nType=notify\nExecStart=/bin/true\nNoSuchKey=1\n")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert "NoSuchKey" in proc.stderr


def test_notify_reload_and_privileged_iptables_steps() -> None:
    e = entries()
    assert e["Type"] == ["notify"]
    assert e["NotifyAccess"] == ["main"]
    assert seconds(e["WatchdogSec"][0]) > 0
    pre = e["ExecStartPre"]
    assert pre[0] == f"{PROXYD} check --config /etc/proxyd/proxyd.yaml"
    assert pre[1].startswith(f"+{PROXYD} iptables --config /etc/proxyd/proxyd.yaml --apply")
    assert e["ExecStart"] == [f"{PROXYD} run --config /etc/proxyd/proxyd.yaml"]
    assert e["ExecReload"] == [f"{PROXYD} check --config /etc/proxyd/proxyd.yaml", "/bin/kill -HUP $MAINPID"]
    assert e["ExecStopPost"] == [f"+{PROXYD} iptables --remove"]
    assert e["Restart"] == ["on-failure"]


def test_user_capabilities_and_hardening() -> None:
    e = entries()
    assert e["User"] == ["proxyd"]
    assert "DynamicUser" not in e  # --uid-owner needs a stable uid
    caps = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert set(e["AmbientCapabilities"][0].split()) == caps
    assert set(e["CapabilityBoundingSet"][0].split()) == caps
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectControlGroups"):
        assert e[key] == ["yes"], key
    assert e["ProtectSystem"] == ["strict"]
    assert e["ProtectHome"] == ["yes"]
    assert set(e["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert e["StateDirectory"] == ["proxyd"]


def test_limits_cover_the_config_defaults() -> None:
    e = entries()
    limits = Limits()
    # What proxyd's start-up check asks for (server.raise_fd_limit): two sockets each, and a reserve.
    nofile = int(e["LimitNOFILE"][0])
    reserve = FdBudget(nofile, 0, []).other  # what the daemon keeps back from connections
    assert nofile >= FDS_PER_CONNECTION * limits.max_connections + FD_BASE + reserve
    assert seconds(e["TimeoutStopSec"][0]) > limits.drain_timeout


def test_sysusers_declares_the_fixed_user() -> None:
    lines = [ln.split() for ln in (REPO / "systemd" / "proxyd.sysusers").read_text().splitlines()]
    assert any(ln[:2] == ["u", "proxyd"] for ln in lines if ln and not ln[0].startswith("#"))


def test_runtime_directory_for_the_admin_socket() -> None:
    e = entries()
    assert e["RuntimeDirectory"] == ["proxyd"]  # /run/proxyd, for admin.socket
    assert e["RuntimeDirectoryMode"] == ["0750"]
    assert "AF_UNIX" in e["RestrictAddressFamilies"][0].split()
