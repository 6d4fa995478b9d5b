"""The weight formats the embedded engine loads (``weights.py`` describes each), without
torch, so that the command line can offer them without loading it."""

from __future__ import annotations

from typing import Literal

WeightFormat = Literal["q4_1", "int8", "fp16", "bf16", "fp32"]
FORMATS: tuple[WeightFormat, ...] = ("q4_1", "int8", "fp16", "bf16", "fp32")
