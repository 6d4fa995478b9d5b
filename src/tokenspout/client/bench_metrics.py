"""The statistics of ``tokenspout bench``, defined as vLLM's ``bench serve`` defines them.

Pure: request timings in, figures out, so that every definition is table-tested.

* TTFT: request start → the first chunk that carries output text.
* ITL: the gaps between consecutive output-carrying chunks, pooled over all requests.
* TPOT: per request, (E2EL − TTFT) / (output tokens − 1), for requests with > 1 token.
* E2EL: request start → the last output-carrying chunk (a trailing usage chunk or
  ``[DONE]`` is not output, so it does not count).
* Goodput: completed requests per second that meet every given SLO (ttft, tpot, e2el).

Each latency gets its mean, median, p90 and p99 in milliseconds; percentiles interpolate
linearly between ranks, as ``numpy.percentile`` does (and vLLM with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: The latencies reported, in the order tables show them.
LATENCIES = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
SLO_NAMES = frozenset({"ttft", "tpot", "e2el"})


@dataclass
class RequestResult:
    """What one benchmark request saw, on the client's clock (seconds)."""

    success: bool = False
    #: Start → first output chunk; None when no output arrived.
    ttft: float | None = None
    #: Start → last output chunk.
    e2el: float | None = None
    #: Gaps between consecutive output chunks.
    itl: list[float] = field(default_factory=list)
    #: The server's usage count when it gave one, else the number of output chunks.
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for requests of one token or none."""
        if self.ttft is None or self.e2el is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile with linear interpolation between closest ranks (numpy's
    default method); 0.0 for no values, as vLLM reports an empty series."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``mean_<name>_ms``, ``median_<name>_ms``, ``std_<name>_ms``, ``p90_<name>_ms``, ...
    (the keys vLLM's ``--save-result`` writes), and ``max_<name>_ms``."""
    ms = [s * 1000.0 for s in seconds]
    mean = sum(ms) / len(ms) if ms else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)) if ms else 0.0
    stats = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": std,
    }
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = percentile(ms, p)
    stats[f"max_{name}_ms"] = max(ms, default=0.0)  # the one stall a percentile can hide
    return stats


def parse_goodput(spec: str | None) -> dict[str, float]:
    """``"ttft:500,tpot:50"`` → ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"goodput SLO {part!r}: expected NAME:MS, NAME one of ttft/tpot/e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {part!r}: {value!r} is not a number") from None
        if slos[name] <= 0:
            raise ValueError(f"goodput SLO {part!r}: must be > 0 ms")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """A completed request meets every SLO; a missing TPOT (one token) meets its SLO, as
    vLLM counts it as 0."""
    values = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    for name, limit_ms in slos.items():
        value = values[name]
        if value is None or value * 1000.0 > limit_ms:
            return False
    return True


def summarize(
    results: Sequence[RequestResult], duration_s: float, slos: dict[str, float] | None = None
) -> dict[str, Any]:
    """Every figure of one benchmark run, flat, under the keys vLLM uses
    (``completed``, ``request_throughput``, ``output_throughput``, ``median_ttft_ms``...).
    Latencies and tokens count completed requests only."""
    done = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in done)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    summary: dict[str, Any] = {
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) * per_second,
        "output_throughput": output_tokens * per_second,
    }
    if slos:
        good = sum(1 for r in done if meets_slos(r, slos))
        summary["goodput_slos_ms"] = dict(slos)
        summary["request_goodput"] = good * per_second
    series: dict[str, list[float]] = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2el for r in done if r.e2el is not None],
    }
    for name in LATENCIES:
        summary.update(latency_stats(name, series[name]))
    errors = [r.error for r in results if r.error]
    if errors:
        summary["errors"] = sorted(set(errors))[:10]
    return summary
