"""How ``proxyd policy`` reaches the daemon's admin API: the unix socket, or TCP with a token.

Over the unix socket (``admin.socket``, or ``--socket``) every request is allowed; over the TCP
address a change needs the bearer token of ``admin.token_file`` (``--token-file``, or the
config's own ``token_file`` when it is readable). See docs/admin-api.md.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxyd.errors import ConfigError

if TYPE_CHECKING:
    from proxyd.config import Config

DEFAULT_ADDRESS = ("127.0.0.1", 9901)
TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class AdminTarget:
    """Where to send admin requests: a unix socket path, or a TCP host and port."""

    socket: Path | None = None
    host: str = DEFAULT_ADDRESS[0]
    port: int = DEFAULT_ADDRESS[1]
    token: str | None = None

    def describe(self) -> str:
        if self.socket is not None:
            return f"unix socket {self.socket}"
        return f"http://{_bracket(self.host)}:{self.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped). Raises ConfigError."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:0: cannot read the admin token: {exc}"]) from exc
    if not token:
        raise ConfigError([f"{path}:0: the admin token file is empty"])
    return token


def resolve(
    *,
    admin: str | None,
    socket_path: Path | None,
    token_file: Path | None,
    config: Config | None,
    config_path: Path | None,
) -> AdminTarget:
    """Pick the target: ``--socket``, else ``--admin``, else the config's socket, else its
    address; the token comes from ``--token-file`` or the config's readable ``token_file``."""
    token = read_token(token_file) if token_file is not None else None
    if socket_path is not None:
        return AdminTarget(socket=socket_path, token=token)
    if admin:
        from proxyd.config import parse_hostport

        hostport = admin.split("://", 1)[-1].rstrip("/")
        try:
            host, port = parse_hostport(hostport, allow_name=True)
        except ValueError as exc:
            raise ConfigError([f"--admin: {exc}"]) from exc
        return AdminTarget(host=host, port=port, token=token)
    if config is not None:
        adm = config.admin
        if adm is None:
            raise ConfigError([f"{config_path}:0: admin: the config has no admin address or socket"])
        if adm.socket is not None:
            return AdminTarget(socket=adm.socket, token=token)
        if token is None and adm.token_file is not None:
            try:
                token = read_token(adm.token_file)
            except ConfigError:
                token = None  # not readable by this user: changes will say how to get access
        assert adm.host is not None
        return AdminTarget(host=adm.host, port=adm.port, token=token)
    return AdminTarget(token=token)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except OSError:
            s.close()
            raise
        self.sock = s


def request(
    target: AdminTarget, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """Send one request; returns (status, decoded JSON answer). Raises OSError when unreachable."""
    conn: http.client.HTTPConnection
    if target.socket is not None:
        conn = _UnixConnection(target.socket, TIMEOUT)
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=TIMEOUT)
    headers = {"Content-Type": "application/yaml"} if body is not None else {}
    if target.token is not None:
        headers["Authorization"] = f"Bearer {target.token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except http.client.HTTPException as exc:
        raise OSError(f"bad answer from the admin API: {exc}") from exc
    finally:
        conn.close()
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        data = {"errors": [f"HTTP {resp.status}: {raw[:200]!r}"]}
    if not isinstance(data, dict):
        data = {"errors": [f"HTTP {resp.status}: unexpected answer"]}
    return resp.status, data
