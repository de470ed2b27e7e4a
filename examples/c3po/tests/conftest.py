"""Make the example importable from a source checkout when it is not pip-installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import proxyd_c3po  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
