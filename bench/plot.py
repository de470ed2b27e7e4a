"""Draw a benchmark's ratio table as a PNG, for the README and bench/results/.

Every bench script (``bench/memcache.py``, ``bench/http.py``, ``bench/redis.py``, ...) calls
:func:`write_ratio_png` after its run with the rows of its main table::

    from plot import Row, write_ratio_png      # bench/ is the script's directory

    write_ratio_png("bench/results/memcache-2026-12-01.png", "memcache, 50 connections", [
        Row("HAProxy", 93623, 1.00, 8.4),
        Row("proxyd L4", 95342, 1.02, 9.2),
        Row("proxyd memcache+policy", 41461, 0.44, 23.7),
    ])

The picture has two panels side by side, one bar per row: throughput as a ratio to the baseline
(HAProxy in the same run; a dashed line marks 1.0, and each bar is labelled with its ops/s and
ratio), and CPU microseconds per operation (labelled with the value and its ratio to the
baseline's). Rows keep their order, top to bottom, so the picture reads like the table.

matplotlib is used through its object API on the Agg canvas (no pyplot, no display, no global
state), so calling this from a test or a headless machine needs nothing else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a benchmark table.

    ``ops_s``: throughput (operations, requests or connections per second);
    ``ratio``: ``ops_s`` relative to the baseline measured in the same run (None: not measured);
    ``cpu_us_op``: CPU microseconds of the proxy process per operation (None: not measured).
    """

    name: str
    ops_s: float
    ratio: float | None
    cpu_us_op: float | None


RowLike = Row | Sequence[object]

BAR = "#4c72b0"
BASE = "#8c8c8c"
PROXYD = "#dd8452"


def _row(r: RowLike) -> Row:
    if isinstance(r, Row):
        row = r
    else:
        if len(r) != 4:
            raise ValueError(f"a row is (name, ops/s, ratio, CPU us/op), got {r!r}")
        name, ops, ratio, cpu = r
        row = Row(str(name), _num(ops, "ops/s"), _opt(ratio, "ratio"), _opt(cpu, "CPU us/op"))
    if not row.name:
        raise ValueError("a row needs a name")
    for label, v in (("ops/s", row.ops_s), ("ratio", row.ratio), ("CPU us/op", row.cpu_us_op)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise ValueError(f"{row.name}: {label} must be a finite number >= 0, got {v!r}")
    return row


def _num(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{what} must be a number, got {v!r}")
    return float(v)


def _opt(v: object, what: str) -> float | None:
    return None if v is None else _num(v, what)


def _colour(name: str, baseline: str) -> str:
    if name == baseline:
        return BASE
    return PROXYD if name.lower().startswith("proxyd") else BAR


def write_ratio_png(
    path: str | os.PathLike[str],
    title: str,
    rows: Iterable[RowLike],
    *,
    baseline: str = "HAProxy",
    unit: str = "ops/s",
    cpu_unit: str = "CPU us/op",
    note: str = "",
) -> Path:
    """Write a PNG of ``rows`` (throughput ratio and CPU per op) to ``path``; return the path.

    ``rows`` are :class:`Row` objects or ``(name, ops_s, ratio, cpu_us_op)`` tuples, drawn top to
    bottom in the order given. ``baseline`` names the row the ratios are to (drawn grey; its CPU
    is the base of the CPU ratios). ``unit``/``cpu_unit`` label the two panels (e.g. ``conn/s``
    and ``CPU us/conn`` for a churn table); ``note`` is a line under the title (machine, date).
    The parent directory is created. Raises ValueError for no rows or a malformed row.
    """
    table = [_row(r) for r in rows]
    if not table:
        raise ValueError("no rows to draw")
    base_cpu = next((r.cpu_us_op for r in table if r.name == baseline), None)
    n = len(table)
    fig = Figure(figsize=(11, 1.2 + 0.55 * n), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    ax_r, ax_c = fig.subplots(1, 2, sharey=True)
    ys = list(range(n))
    names = [r.name for r in table]
    colours = [_colour(r.name, baseline) for r in table]

    ratios = [r.ratio or 0.0 for r in table]
    ax_r.barh(ys, ratios, color=colours)
    ax_r.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    top = max([*ratios, 1.0])
    ax_r.set_xlim(0, top * 1.45)
    for y, r in zip(ys, table, strict=True):
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        ax_r.text(
            (r.ratio or 0.0) + top * 0.02, y, f"{r.ops_s:,.0f} {unit}  ({ratio})", va="center", fontsize=9
        )
    ax_r.set_xlabel(f"{unit}, ratio to {baseline} (same run)")
    ax_r.set_yticks(ys, names)
    ax_r.invert_yaxis()

    cpus = [r.cpu_us_op or 0.0 for r in table]
    ax_c.barh(ys, cpus, color=colours)
    ctop = max([*cpus, 1e-9])
    ax_c.set_xlim(0, ctop * 1.45)
    for y, r in zip(ys, table, strict=True):
        if r.cpu_us_op is None:
            label = "-"
        elif base_cpu:
            label = f"{r.cpu_us_op:,.1f}  ({r.cpu_us_op / base_cpu:.2f}x)"
        else:
            label = f"{r.cpu_us_op:,.1f}"
        ax_c.text((r.cpu_us_op or 0.0) + ctop * 0.02, y, label, va="center", fontsize=9)
    ax_c.set_xlabel(cpu_unit + " (lower is better)")
    for ax in (ax_r, ax_c):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": None})
    return out
