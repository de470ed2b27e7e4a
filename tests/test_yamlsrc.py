"""The YAML reader's libyaml path gives what the pure-Python path gives (values, lines, errors),
and its value cap scales with the text instead of stopping a large honest file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxyd import yamlsrc
from proxyd.config import load_config
from proxyd.errors import ConfigError
from proxyd.yamlsrc import LList, LMap, YamlSyntaxError, load_documents, load_one

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted(
    [
        *ROOT.glob("tests/policy/fixtures/**/*.yaml"),
        *ROOT.glob("examples/**/*.yaml"),
        *ROOT.glob("deploy/**/*.yaml"),
    ]
)


def shape(value: Any) -> Any:
    """A value with the line of every mapping, key, sequence and item, for comparing paths."""
    if isinstance(value, LMap):
        return ("map", value.where.line, {k: (value.key_lines[k], shape(v)) for k, v in value.items()})
    if isinstance(value, LList):
        return (
            "list",
            value.where.line,
            [(ln, shape(v)) for ln, v in zip(value.item_lines, value, strict=True)],
        )
    return (type(value).__name__, value)


def pure(text: str, aliases: bool = False) -> list[Any]:
    saved = yaml.__with_libyaml__
    yaml.__with_libyaml__ = False
    try:
        return [(shape(v), w.line) for v, w in load_documents(text, "f.yaml", aliases=aliases)]
    finally:
        yaml.__with_libyaml__ = saved


def fast(text: str, aliases: bool = False) -> list[Any]:
    return [(shape(v), w.line) for v, w in load_documents(text, "f.yaml", aliases=aliases)]


def test_libyaml_is_there() -> None:
    assert yaml.__with_libyaml__  # the fast path is what the daemon runs


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_fast_path_reads_the_repo_yaml_as_the_pure_path_does(path: Path) -> None:
    text = path.read_text()
    assert fast(text, aliases=True) == pure(text, aliases=True)


SCALARS = """\
a: 1
b: 1.5
c: true
d: ~
e: ""
f: '007'
g: 0x1f
h: 2026-12-07
i: yes
j: -.inf
k:
  - x
  - [1, {y: z}]
  - {}
"3": three
4: four
---
- just
- a list
---
plain
"""


def test_scalars_tags_and_documents_as_the_pure_path() -> None:
    assert fast(SCALARS) == pure(SCALARS)


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",  # duplicate key
        "a: &x 1\nb: *x\n",  # anchors refused in policy text
        "[" * 200 + "]" * 200,  # too deep
        "a: !!python/object:os.system x\n",  # unknown tag
        "a: [\n",  # syntax
        "a: b\x00\n",  # NUL
        "? [a]\n: b\n",  # a non-scalar key
        "a: !!binary aGVsbG8=\n",
    ],
)
def test_refusals_read_as_the_pure_path_words_them(text: str) -> None:
    def problem(fn: Any) -> str:
        try:
            return repr(fn(text))
        except YamlSyntaxError as exc:
            return str(exc)

    assert problem(fast) == problem(pure)


def test_config_anchors_and_merge_keys_expand() -> None:
    text = "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  z: 3\nlist: [*b, *b]\n"
    got = load_one(text, "c.yaml")
    assert got["use"] == {"x": 1, "y": 2, "z": 3} and got["list"] == [{"x": 1, "y": 2}] * 2
    assert fast(text, aliases=True) == pure(text, aliases=True)


def test_value_cap_scales_with_the_text() -> None:
    # 120,000 entries of 3 labels: more values than the fixed floor, but honest text.
    entries = "".join(f"- {{cidr: 10.0.{i >> 8 & 255}.{i & 255}/32, a: x, b: y}}\n" for i in range(120_000))
    (doc, _), *_ = load_documents(entries, "ids.yaml")
    assert len(doc) == 120_000
    assert yamlsrc.max_values(entries) > 1_000_000


def test_alias_expansion_is_still_capped() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    with pytest.raises(YamlSyntaxError, match="more than"):
        load_one("\n".join(lines) + "\n", "bomb.yaml")


@pytest.mark.parametrize("shift", range(5))
def test_config_text_is_read_as_read_text_reads_it(tmp_path: Path, shift: int) -> None:
    """The config is decoded a slice at a time and kept in parts (config.read_parts): a CRLF or
    a character of several bytes across a slice boundary, and lone CRs, come out as
    Path.read_text gives them, so a problem's line number is the same."""
    from proxyd.config import READ_SLICE, read_parts, read_text

    head = "#" + "x" * (READ_SLICE - 4 - shift) + "\r\n"  # CRLF, then "# é€😀", across the boundary
    text = head + "# \u00e9\u20ac\U0001f600 caf\u00e9\r\nlisteners: []\rlimits: {max_connections: -1}\r\n"
    path = tmp_path / "proxyd.yaml"
    path.write_bytes(text.encode("utf-8"))
    assert read_text(path) == path.read_text()
    assert len(read_parts(path).parts) >= 2
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [
        f"{path}:3: listeners: required: a non-empty list of listeners",
        f"{path}:4: limits.max_connections: must be greater than 0",
    ]
