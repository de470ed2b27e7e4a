"""bench/plot.py draws a benchmark's ratio table as a real PNG; bench/memcache.py feeds it."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    """Import bench/<name>.py as the scripts see it (bench/ on sys.path: they import plot as a sibling).

    bench/ goes last on the path: first, its http.py and kafka.py would shadow the standard
    library's http package and kafka-python for every test collected after this one.
    """
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    if name == "plot":
        return importlib.import_module("plot")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


plot = _load("plot")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def _colours(path: Path) -> set[tuple[int, int, int]]:
    from matplotlib.image import imread

    img = imread(path)
    px = (img[..., :3] * 255).round().astype(int).reshape(-1, 3)
    return {(int(r), int(g), int(b)) for r, g, b in px}


def _rgb(hexcolour: str) -> tuple[int, int, int]:
    h = hexcolour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


ROWS = [
    plot.Row("memcached direct", 200584, 2.14, 5.0),
    ("HAProxy", 93623, 1.0, 8.4),
    ("proxyd L4", 95342, 1.02, 9.2),
    plot.Row("proxyd memcache+policy", 41461, 0.44, 23.7),
]


def test_writes_png_with_bars_for_each_kind_of_row(tmp_path: Path) -> None:
    out = plot.write_ratio_png(tmp_path / "sub" / "m.png", "memcache, 50 connections", ROWS, note="2 cores")
    assert out == tmp_path / "sub" / "m.png"
    w, h = _png_size(out)
    assert w == 1100 and h > 200
    colours = _colours(out)
    # the baseline bar (grey), proxyd's bars and the other targets' bars are all drawn
    for c in (plot.BASE, plot.PROXYD, plot.BAR):
        assert _rgb(c) in colours, c


def test_height_grows_with_rows(tmp_path: Path) -> None:
    _, h2 = _png_size(plot.write_ratio_png(tmp_path / "a.png", "t", ROWS[:2]))
    _, h4 = _png_size(plot.write_ratio_png(tmp_path / "b.png", "t", ROWS))
    assert h4 > h2


def test_unmeasured_values_draw_without_error(tmp_path: Path) -> None:
    out = plot.write_ratio_png(
        tmp_path / "c.png", "churn", [("HAProxy", 9586, 1.0, None), ("proxyd L4", 3848, None, 249.9)],
        unit="conn/s", cpu_unit="CPU us/conn",
    )  # fmt: skip
    assert _png_size(out)[0] > 0


@pytest.mark.parametrize(
    ("rows", "msg"),
    [
        ([], "no rows"),
        ([("x", 1.0, 1.0)], "a row is"),
        ([("x", "fast", 1.0, 1.0)], "ops/s must be a number"),
        ([("x", 1.0, -1.0, 1.0)], "ratio must be a finite number"),
        ([("x", 1.0, 1.0, float("nan"))], "CPU us/op must be a finite number"),
        ([("", 1.0, 1.0, 1.0)], "needs a name"),
    ],
)
def test_bad_rows_are_rejected(tmp_path: Path, rows: list[object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        plot.write_ratio_png(tmp_path / "bad.png", "t", rows)  # type: ignore[arg-type]
    assert not (tmp_path / "bad.png").exists()


def test_memcache_bench_draws_its_ops_table(tmp_path: Path) -> None:
    memcache = _load("memcache")
    rows = {
        "direct": {"tps": 200584, "cpu_us_op": 5.0},
        "HAProxy": {"tps": 93623, "cpu_us_op": 8.4},
        "proxyd L4": {"tps": 95342, "cpu_us_op": 9.2},
    }
    out = memcache.write_png(tmp_path / "memcache.png", {"ops50": rows, "ops1": rows}, "2026-12-01")
    assert out is not None and _png_size(out)[0] > 0
    assert _rgb(plot.PROXYD) in _colours(out)
    assert memcache.write_png(tmp_path / "none.png", {}, "x") is None


def test_every_bench_script_draws_its_table() -> None:
    """Each bench/*.py with a ratio table (measured against HAProxy) also writes it as a PNG."""
    scripts = [p for p in BENCH.glob("*.py") if p.name != "plot.py" and "HAProxy" in p.read_text()]
    assert any(p.name == "memcache.py" for p in scripts)
    silent = [p.name for p in scripts if "write_ratio_png" not in p.read_text()]
    assert not silent, (
        f"bench scripts whose ratio table has no PNG: {silent}; after writing the results table call "
        "`from plot import Row, write_ratio_png` and write_ratio_png(out.with_suffix('.png'), title, "
        "[Row(name, ops_s, ratio_to_haproxy, cpu_us_op), ...]) (see bench/memcache.py's write_png)"
    )


def test_rounds_combine_into_medians_and_per_round_ratios() -> None:
    """bench/benchlib.combine_rounds: the table's numbers are medians over interleaved rounds."""
    benchlib = _load("benchlib")
    def run(tps: float, cpu: float, get: float) -> dict[str, object]:
        return {"tps": tps, "cpu": cpu, "rps": {"GET": get}}

    rounds = {
        "HAProxy": [run(100.0, 2.0, 90.0), run(200.0, 1.0, 190.0), run(100.0, 1.0, 110.0)],
        "proxyd": [run(90.0, 2.0, 80.0), run(220.0, 1.5, 200.0), run(80.0, 1.0, 70.0)],
        "pure": [run(10.0, 20.0, 10.0)],
    }
    got = benchlib.combine_rounds(rounds, "HAProxy", "tps", "cpu")
    assert got["proxyd"]["tps"] == 90.0 and got["proxyd"]["rps"] == {"GET": 80.0}
    assert got["proxyd"]["ratio_rounds"] == [0.9, 1.1, 0.8] and got["proxyd"]["ratio"] == 0.9
    assert got["proxyd"]["cpu_ratio_rounds"] == [1.0, 1.5, 1.0] and got["proxyd"]["cpu_ratio"] == 1.0
    assert got["HAProxy"]["ratio"] == 1.0 and got["HAProxy"]["rounds"] == 3
    # a target run in the first round only is compared with the base's first round
    assert got["pure"]["ratio_rounds"] == [0.1] and got["pure"]["rounds"] == 1
    assert benchlib.each_round(got["proxyd"]["ratio_rounds"]) == "0.90 / 1.10 / 0.80"
