"""The end-of-run table of ``tokenspout bench`` and its ``--json`` file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from tokenspout.client.bench import SYNTHETIC_TITLE, BenchConfig, LevelResult
from tokenspout.client.bench_metrics import LATENCIES, PERCENTILES

_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


def table(levels: Sequence[LevelResult], *, synthetic: bool = False) -> Table:
    """One column per concurrency level, one row per figure; the title says when the server
    was tokenspout's synthetic engine (never to be taken for a model's figures)."""
    title = f"tokenspout bench: {SYNTHETIC_TITLE}" if synthetic else None
    out = Table(title=title or "tokenspout bench")
    out.add_column("")
    for level in levels:
        out.add_column(f"concurrency {level.concurrency}", justify="right")

    def row(label: str, key: str, fmt: str) -> None:
        out.add_row(label, *(format(lv.summary.get(key, float("nan")), fmt) for lv in levels))

    row("completed", "completed", "d")
    row("failed", "failed", "d")
    row("duration (s)", "duration_s", ".2f")
    row("output tokens", "total_output_tokens", "d")
    row("request throughput (req/s)", "request_throughput", ".2f")
    row("output throughput (tok/s)", "output_throughput", ".1f")
    if levels and "request_goodput" in levels[0].summary:
        row("goodput (req/s)", "request_goodput", ".2f")
    for name in LATENCIES:
        out.add_section()
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            row(f"{stat} {_NAMES[name]} (ms)", f"{stat}_{name}_ms", ".1f")
    return out


def to_json(config: BenchConfig, levels: Sequence[LevelResult]) -> Any:
    """Every figure with the run's settings: one object for one concurrency level (vLLM's
    ``--save-result`` shape), a list of them for a sweep."""
    settings = {
        "url": config.url,
        "endpoint": config.endpoint.value,
        "protocol": config.protocol.value,
        "model": config.model,
        "synthetic": config.synthetic,
        "max_tokens": config.max_tokens,
        "request_rate": None if config.request_rate == float("inf") else config.request_rate,
        "ignore_eos": config.ignore_eos,
        "temperature": config.temperature,
        "seed": config.seed,
        "distinct_prompts": config.distinct_prompts,
    }
    rows = [{**settings, **level.summary} for level in levels]
    return rows[0] if len(rows) == 1 else rows


def write_json(path: Path, config: BenchConfig, levels: Sequence[LevelResult]) -> None:
    """Write ``to_json``'s figures to ``path`` (replacing the file)."""
    path.write_text(json.dumps(to_json(config, levels), indent=2) + "\n")
