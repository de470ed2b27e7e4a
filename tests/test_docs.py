"""The repository's docs stand alone and say what the code does.

A clone has no steering notes beside it, so nothing may cite them; every relative link leads to a
file that exists; the Python snippets of the parser tutorial carry their imports; the error lines
the configuration page shows are what `proxyd check` prints; and no page tells a newcomer to
`pip install` a package that is not published.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "bench").glob("*.md")])

# Spelled in pieces so this file does not cite what it forbids.
_SHARED = "sha" + "red"
_DESIGN = "DES" + "IGN.md"
CITATION = re.compile(rf"(\.\./{_SHARED}\b|/work/{_SHARED}\b|\b{_SHARED}/(notes|{_DESIGN})|\b{_DESIGN})")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
        names = [n for n in out.stdout.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "build", "node_modules", "__pycache__"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_no_file_cites_notes_outside_the_repository() -> None:
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (PNG, ...)
        for n, line in enumerate(text.splitlines(), 1):
            if CITATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "cite the repo's own docs (docs/*.md) instead:\n" + "\n".join(hits)


def test_the_citation_check_catches_each_form() -> None:
    forms = (f"see ../{_SHARED}/{_DESIGN}", f"({_DESIGN} §2)", f"{_SHARED}/notes/x.md", f"/work/{_SHARED}/y")
    for bad in forms:
        assert CITATION.search(bad), bad
    assert not CITATION.search("test_labels_are_read_only_and_shared()")


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(doc: Path) -> None:
    broken = []
    for target, _ in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_installs_an_unpublished_package(doc: Path) -> None:
    """proxyd is not on a package index: install from a checkout, a built wheel, or the image."""
    bad = re.findall(r"pip install (?:-U |--upgrade )?proxyd(?=[\s`'\"]|$)", doc.read_text(), re.M)
    assert not bad, f"{doc.relative_to(ROOT)} says {bad[0]!r}"


def _python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)


def test_parser_tutorial_snippets_carry_their_imports(tmp_path: Path) -> None:
    blocks = _python_blocks(ROOT / "docs" / "writing-a-parser.md")
    assert len(blocks) >= 5
    files = []
    for i, code in enumerate(blocks):
        ast.parse(code)  # each snippet is valid Python on its own
        f = tmp_path / f"snippet{i}.py"
        f.write_text(code)
        files.append(str(f))
    ruff = Path(sys.executable).parent / "ruff"
    res = subprocess.run(
        [str(ruff) if ruff.exists() else "ruff", "check", "--isolated", "--select", "F821,F822,F823",
         "--output-format", "concise", *files],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, "a snippet uses a name it does not import or define:\n" + res.stdout


def test_configuration_error_examples_are_what_check_prints(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    shown = re.search(r"before that:\n\n```\n(.*?)```", doc, re.S)
    assert shown, "the error-path example moved"
    cfg = tmp_path / "proxyd.yaml"
    cfg.write_text(
        "listeners:\n"
        "  - name: r2d2\n"
        '    address: "127.0.0.1:0"\n'
        "    parser_config: {colour: red}\n"
        "    l7proto: r2d2\n"
        "  - l7proto: r2d2\n"
        '    address: "127.0.0.1:0"\n'
    )
    res = subprocess.run([sys.executable, "-m", "proxyd", "check", "--config", str(cfg)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1
    printed = [line.replace(str(cfg), "proxyd.yaml") for line in res.stderr.splitlines()]
    for line in shown.group(1).strip().splitlines():
        assert line in printed, (line, printed)


DENIED = {  # l7proto row of parser-api.md's denial table -> (rules, a request those rules deny)
    "r2d2": ([{"cmd": "HALT"}], b"READ /x\r\n"),
    "memcache, text and meta": ([{"command": "get"}], b"delete k\r\n"),
    "http": ([{"method": "GET"}], b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n"),
    "redis": ([{"command": "get"}], b"*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n"),
}


@pytest.mark.parametrize("row", sorted(DENIED))
def test_parser_api_denial_answers_are_what_the_parsers_send(row: str) -> None:
    from proxyd.testing import Harness

    doc = (ROOT / "docs" / "parser-api.md").read_text()
    cells = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", doc.split("## Denials", 1)[1], re.M))
    quoted = re.findall(r"`([^`]+)`", cells[row])
    shown = [c.encode().decode("unicode_escape").encode("latin-1") for c in quoted]
    rules, request = DENIED[row]
    h = Harness(row.split(",")[0], rules=rules)
    h.feed(request)
    assert h.to_server == b""  # denied: the server never sees it
    if row == "http":  # the cell spells the answer in parts
        assert all(part in h.to_client for part in shown[:3])
        assert h.to_client.endswith(b"\r\n\r\nAccess denied\r\n")
    else:
        assert h.to_client == shown[0]
