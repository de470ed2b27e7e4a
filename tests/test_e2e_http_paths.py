"""Path normalisation end to end (issue 17 item 11): what nginx served is what the rule judged.

nginx (tests/http_servers.py) resolves dot segments, merges slashes and decodes escapes itself:
sent directly, ``GET /api/../index.html`` is served ``/index.html``. Through proxyd with
``path: "/api/.*"`` it is denied, and the spellings of ``/api/x`` reach nginx as ``/api/x``
(nginx's access log records the request line as it arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from http_servers import Nginx, start_nginx
from needs import need_binary
from proxyutil import addr, daemon, wait_for

from proxyd.server import Daemon

TIMEOUT = 10.0

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: web}
      toPorts:
        - ports: [{port: "NGINX", protocol: TCP}]
          rules:
            http:
              - path: "/api/.*"
"""

CONFIG = """
listeners:
  - name: web
    address: "127.0.0.1:0"
    l7proto: http
    upstream: "127.0.0.1:{port}"
    parser_config: {cfg}
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: web}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with start_nginx(tmp_path_factory.mktemp("nginx")) as n:
        yield n


@contextlib.asynccontextmanager
async def proxy(nginx: Nginx, tmp_path: Path, cfg: str = "{}") -> AsyncIterator[Daemon]:
    files = {"policy.yaml": POLICY.replace("NGINX", str(nginx.port))}
    async with daemon(CONFIG.format(port=nginx.port, cfg=cfg), tmp_path, files=files) as d:
        yield d


async def ask(host: str, port: int, target: bytes) -> tuple[int, bytes, bytes]:
    """One request on its own connection: (status, head, body)."""
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await w.drain()
    raw = await asyncio.wait_for(r.read(), TIMEOUT)
    w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head[9:12]), head, body


def requests_seen(nginx: Nginx, before: int) -> list[str]:
    return [s.split("|")[0] for s in nginx.seen()[before:]]


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]


async def test_dot_dot_out_of_a_prefix_rule_is_denied_and_never_served(nginx: Nginx, tmp_path: Path) -> None:
    # directly, nginx serves /index.html for it: the attack the rule must not let through
    status, _, body = await ask("127.0.0.1", nginx.port, b"/api/../index.html")
    assert (status, body) == (200, b"index\n")
    async with proxy(nginx, tmp_path) as d:
        before = len(nginx.seen())
        status, _, body = await ask(*addr(d, "web"), b"/api/../index.html")
        assert (status, body) == (403, b"Access denied\r\n")
        assert requests_seen(nginx, before) == []


async def test_through_proxyd_nginx_serves_what_the_rule_judged(nginx: Nginx, tmp_path: Path) -> None:
    async with proxy(nginx, tmp_path) as d:
        host, port = addr(d, "web")
        before = len(nginx.seen())
        for target in (
            b"/api/../index.html",
            b"/api/%2e%2e/index.html",
            b"/api/..\\index.html",
            b"/api/x/../../secret.txt",
        ):
            status, _, body = await ask(host, port, target)
            assert (status, body) == (403, b"Access denied\r\n"), target
        assert requests_seen(nginx, before) == []  # nginx never saw them
        for target in (b"/api/./x", b"/api//x", b"/api/y/../x", b"/%61pi/x", b"/api/x"):
            status, _, body = await ask(host, port, target)
            assert (status, body) == (200, b"api /api/x\n"), target
        await wait_for(lambda: len(nginx.seen()) >= before + 5)
        assert requests_seen(nginx, before) == ["GET /api/x HTTP/1.1"] * 5  # the request line nginx read
        # the query string is the client's, untouched
        status, _, body = await ask(host, port, b"/api//q?a=/../b//c&d=%2F")
        assert status == 200
        await wait_for(lambda: len(nginx.seen()) >= before + 6)
        assert requests_seen(nginx, before)[-1] == "GET /api/q?a=/../b//c&d=%2F HTTP/1.1"
        await wait_for(
            lambda: (
                sum(
                    1
                    for x in log_lines(tmp_path)
                    if x.get("entry_type") == "request" and "method" in x.get("fields", {})
                )
                >= 10
            )
        )
        reqs = [
            x["fields"]
            for x in log_lines(tmp_path)
            if x.get("entry_type") == "request" and "method" in x.get("fields", {})
        ]
        assert reqs[0]["path"] == "/index.html" and reqs[0]["original_path"] == "/api/../index.html"
        assert reqs[4]["path"] == "/api/x" and reqs[4]["original_path"] == "/api/./x"
        assert "original_path" not in reqs[8]  # /api/x was already normal


async def test_escaped_slash_is_redirected_by_default(nginx: Nginx, tmp_path: Path) -> None:
    async with proxy(nginx, tmp_path) as d:
        host, port = addr(d, "web")
        before = len(nginx.seen())
        status, head, body = await ask(host, port, b"/api/a%2F..%2F..%2Findex.html")
        assert (status, body) == (307, b"")
        assert re.search(rb"\r\nlocation: /index.html(\r\n|$)", head)
        assert requests_seen(nginx, before) == []


async def test_escaped_slash_reject_request(nginx: Nginx, tmp_path: Path) -> None:
    # Why escaped slashes are not kept by default: nginx decodes %2F and then resolves the dot
    # segment, so "/api/..%2Findex.html" (one segment named "..%2Findex.html" for the rule) is
    # served /index.html (docs/parsers/http.md, KEEP_UNCHANGED).
    direct = await ask("127.0.0.1", nginx.port, b"/api/..%2Findex.html")
    assert direct[0] == 200 and direct[2] == b"index\n"
    async with proxy(nginx, tmp_path, "{path_with_escaped_slashes_action: REJECT_REQUEST}") as d:
        status, _, body = await ask(*addr(d, "web"), b"/api/..%2Findex.html")
        assert (status, body) == (400, b"Bad Request\r\n")


async def test_keep_unchanged_does_what_its_warning_says(nginx: Nginx, tmp_path: Path) -> None:
    # the documented risk of the non-default KEEP_UNCHANGED, pinned so the warning stays true
    async with proxy(nginx, tmp_path / "keep", "{path_with_escaped_slashes_action: KEEP_UNCHANGED}") as d:
        status, _, body = await ask(*addr(d, "web"), b"/api/..%2Findex.html")
        assert (status, body) == (200, b"index\n")


async def test_absolute_form_targets_are_normalised_too(nginx: Nginx, tmp_path: Path) -> None:
    status, _, body = await ask("127.0.0.1", nginx.port, b"http://x/api/../index.html")
    assert (status, body) == (200, b"index\n")  # nginx serves absolute-form targets as well
    async with proxy(nginx, tmp_path) as d:
        host, port = addr(d, "web")
        before = len(nginx.seen())
        status, _, body = await ask(host, port, b"http://x/api/../index.html")
        assert status == 403
        status, _, body = await ask(host, port, b"http://x/api//x?y=//")
        assert (status, body) == (200, b"api /api/x\n")
        await wait_for(lambda: len(nginx.seen()) >= before + 1)
        assert requests_seen(nginx, before) == ["GET http://x/api/x?y=// HTTP/1.1"]


async def test_curl_follows_the_escaped_slash_redirect_to_what_the_rule_allows(
    nginx: Nginx, tmp_path: Path
) -> None:
    need_binary("curl")
    async with proxy(nginx, tmp_path) as d:
        host, port = addr(d, "web")
        before = len(nginx.seen())
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-L", "--path-as-is", "--max-time", "20", "-w", "|%{http_code} %{num_redirects}",
            f"http://{host}:{port}/api/a%2Fb",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert out == b"api /api/a/b\n|200 1", err
        await wait_for(lambda: len(nginx.seen()) >= before + 1)
        assert requests_seen(nginx, before) == ["GET /api/a/b HTTP/1.1"]
