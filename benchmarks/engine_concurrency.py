"""Embedded engine under concurrent streams, next to the llama.cpp reference.

Setup of benchmarks/REFERENCE (shared/REFERENCE.md): chat prompt "Write a long story about a
dragon and a knight.", 128 output tokens, ``ignore_eos``, temperature 0.8, all requests at
once, concurrency 1 / 4 / 16, medians over repetitions. The engine is driven in-process
through the ``Engine`` interface. The prefix cache is off by default because the reference
clears llama.cpp's slots between runs (``--prefix-cache`` turns it on).

    .venv/bin/python benchmarks/engine_concurrency.py [--reps 3] [--write]

``--write`` replaces the "Embedded engine concurrency" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenspout.engine.interface import Engine
from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.engine.request import ChatMessage, SamplingParams

PROMPT = "Write a long story about a dragon and a knight."
OUTPUT_TOKENS = 128
SEED = 1234
SECTION = "## Embedded engine concurrency"
RESULTS = Path(__file__).with_name("RESULTS.md")
#: llama.cpp server, 2 threads, 16 slots (REFERENCE.md): TTFT p50 ms, ITL ms, e2e s, tok/s.
LLAMA_CPP = {1: (91, 12.3, 1.65, 78), 4: (338, 33, 4.54, 113), 16: (1212, 114, 15.64, 131)}


@dataclass(frozen=True)
class Run:
    """One repetition at one concurrency level."""

    ttft_p50_ms: float
    itl_mean_ms: float
    e2e_p50_s: float
    tok_s: float


async def one_stream(engine: Engine, rid: str, t0: float, seed: int) -> tuple[float, list[float]]:
    """Return (ttft, times of every output) for one request started at ``t0``."""
    prompt = engine.encode_chat([ChatMessage("user", PROMPT)])
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.8, ignore_eos=True, seed=seed)
    times = [
        time.perf_counter() async for out in engine.generate(rid, prompt, params) if out.num_tokens
    ]
    return times[0] - t0, times


async def one_run(engine: Engine, concurrency: int, rep: int) -> Run:
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(one_stream(engine, f"r{rep}-{i}", t0, SEED + rep * 100 + i) for i in range(concurrency))
    )
    itls = [b - a for _, times in results for a, b in itertools.pairwise(times)]
    ends = [times[-1] - t0 for _, times in results]
    tokens = sum(len(times) for _, times in results)
    return Run(
        ttft_p50_ms=1000 * statistics.median(ttft for ttft, _ in results),
        itl_mean_ms=1000 * statistics.mean(itls),
        e2e_p50_s=statistics.median(ends),
        tok_s=tokens / max(ends),
    )


def median_run(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in Run.__dataclass_fields__))


def table(results: dict[int, Run]) -> str:
    lines = [
        "| concurrency | TTFT p50 | mean ITL | e2e p50 | aggregate output tok/s "
        "| llama.cpp (TTFT / ITL / e2e / tok/s) |",
        "|---|---|---|---|---|---|",
    ]
    for c, r in results.items():
        ref = LLAMA_CPP.get(c)
        ref_s = f"{ref[0]} ms / {ref[1]} ms / {ref[2]} s / {ref[3]}" if ref else "-"
        lines.append(
            f"| {c} | {r.ttft_p50_ms:.0f} ms | {r.itl_mean_ms:.1f} ms | {r.e2e_p50_s:.2f} s "
            f"| {r.tok_s:.0f} | {ref_s} |"
        )
    return "\n".join(lines)


def write_section(body: str) -> None:
    """Replace (or append) our section of RESULTS.md, leaving the others untouched."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + body + (old[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(new.rstrip("\n") + "\n")


async def bench(args: argparse.Namespace) -> str:
    engine = LLMEngine(max_num_seqs=16, prefix_cache=args.prefix_cache, weights=args.weights)
    t = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t
    # One short request so that one-time costs (first kernels, allocations) are not timed.
    await one_run(engine, 1, rep=-1)
    results = {}
    for c in args.concurrency:
        results[c] = median_run([await one_run(engine, c, rep) for rep in range(args.reps)])
        print(f"concurrency {c}: {results[c]}", flush=True)
    stats = engine.stats()
    await engine.shutdown()
    return "\n".join(
        [
            SECTION,
            "",
            "`" + " ".join([".venv/bin/python benchmarks/engine_concurrency.py", *args.argv]) + "`",
            "",
            f"Model `{engine.model_id}`, weights {args.weights}, in-process through the `Engine` "
            f"interface, prefix cache {'on' if args.prefix_cache else 'off'}, "
            f"{torch.get_num_threads()} torch threads, {platform.machine()}; "
            f'medians of {args.reps} repetitions. Chat prompt "{PROMPT}", {OUTPUT_TOKENS} output '
            "tokens, ignore_eos, temperature 0.8, all requests at once.",
            "",
            table(results),
            "",
            f"- Warm start (`await engine.start()`, model file in page cache): {start_s:.2f} s.",
            f"- Tokens computed in prefill: {stats.prompt_tokens_total}; generated: "
            f"{stats.generation_tokens_total}.",
            "- Goals: 1 stream >= 80 tok/s, 16 streams >= 260 tok/s, TTFT p50 at 16 <= 600 ms.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--weights", default="int8")
    parser.add_argument("--prefix-cache", action="store_true")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.manual_seed(SEED)
    body = asyncio.run(bench(args))
    print(body)
    if args.write:
        write_section(body)


if __name__ == "__main__":
    main()
