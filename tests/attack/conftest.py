"""The attack suite drives the same attack clients as ``benchmarks/attack_suite.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
