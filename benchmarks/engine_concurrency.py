"""Embedded engine under concurrent streams, next to the llama.cpp reference.

Setup of benchmarks/REFERENCE (shared/REFERENCE.md): chat prompt "Write a long story about a
dragon and a knight.", 128 output tokens, ``ignore_eos``, temperature 0.8, all requests at
once, concurrency 1 / 4 / 16, medians over repetitions. The engine is driven in-process
through the ``Engine`` interface, with the prefix cache off (comparable: the reference
clears llama.cpp's slots between runs) and on (the server's default).

    .venv/bin/python benchmarks/engine_concurrency.py [--reps 3] [--prefix-cache both] [--write]

``--write`` replaces the "Embedded engine concurrency" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
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
from tokenspout.engine.weights import default_format

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


async def one_stream(
    engine: Engine, rid: str, t0: float, seed: int, max_tokens: int
) -> tuple[float, list[float]]:
    """Return (ttft, times of every output) for one request started at ``t0``."""
    prompt = engine.encode_chat([ChatMessage("user", PROMPT)])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, ignore_eos=True, seed=seed)
    times = [
        time.perf_counter() async for out in engine.generate(rid, prompt, params) if out.num_tokens
    ]
    return times[0] - t0, times


async def one_run(
    engine: Engine, concurrency: int, rep: int, max_tokens: int = OUTPUT_TOKENS
) -> Run:
    t0 = time.perf_counter()
    seeds = [SEED + rep * 100 + i for i in range(concurrency)]
    results = await asyncio.gather(
        *(one_stream(engine, f"r{rep}-{i}", t0, s, max_tokens) for i, s in enumerate(seeds))
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


async def bench_mode(args: argparse.Namespace, prefix_cache: bool) -> list[str]:
    """Time every concurrency level on a fresh engine; return this mode's report lines."""
    engine = LLMEngine(max_num_seqs=16, prefix_cache=prefix_cache, weights=args.weights)
    t = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t
    n_prompt = len(engine.encode_chat([ChatMessage("user", PROMPT)]).token_ids)
    # The first burst pays one-time kernel set-up (over a second for the first ragged decode
    # batch): report it apart, and time warm runs only.
    cold = await one_run(engine, max(args.concurrency), rep=-1, max_tokens=8)
    results = {}
    for c in args.concurrency:
        results[c] = median_run([await one_run(engine, c, rep) for rep in range(args.reps)])
        print(f"prefix cache {prefix_cache}, concurrency {c}: {results[c]}", flush=True)
    stats = engine.stats()
    await engine.shutdown()
    what = (
        "on: repetitions reuse the previous ones' prompt KV, and requests of one burst compute "
        "their shared prompt once"
        if prefix_cache
        else "off, like the reference's slots cleared between runs"
    )
    return [
        f"### Prefix cache {'on' if prefix_cache else 'off'}",
        "",
        f"Prefix cache {what}. Model `{engine.model_id}`, {n_prompt} prompt tokens with its chat "
        "template (llama.cpp's rendering: 20).",
        "",
        table(results),
        "",
        f"- Warm start (`await engine.start()`, model file in page cache): {start_s:.2f} s.",
        f"- First burst after start ({max(args.concurrency)} requests, 8 tokens, not in the "
        f"table): TTFT p50 {cold.ttft_p50_ms:.0f} ms.",
        f"- Prompt tokens computed: {stats.prompt_tokens_total}; generated: "
        f"{stats.generation_tokens_total}; prefix cache hits/queries: "
        f"{stats.prefix_cache_hits_total}/{stats.prefix_cache_queries_total}.",
        "",
    ]


async def bench(args: argparse.Namespace) -> str:
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.prefix_cache]
    lines = [
        SECTION,
        "",
        "`" + " ".join([".venv/bin/python benchmarks/engine_concurrency.py", *args.argv]) + "`",
        "",
        f"Weights {args.weights}, in-process through the `Engine` interface, "
        f"{torch.get_num_threads()} torch threads, {platform.machine()}, medians of "
        f'{args.reps} repetitions. Chat prompt "{PROMPT}", {OUTPUT_TOKENS} output tokens, '
        "ignore_eos, temperature 0.8, all requests at once. Goals: 1 stream >= 80 tok/s, "
        "16 streams >= 260 tok/s, TTFT p50 at 16 <= 600 ms.",
        "",
    ]
    for prefix_cache in modes:
        lines += await bench_mode(args, prefix_cache)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        f"Load average at the end (1/5/15 min): {load}; the machine is shared, so compare the "
        "ratios within one run. Most of a step is `ModelRunner.forward` (see the decode step "
        "section); the engine adds sampling (about 1 ms for 1 row, 2-4 ms for 16) and "
        "detokenization. The first burst after start pays the runner's one-time kernel set-up.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    # The server's own default (q4_1 where the C kernels build), not an older format.
    parser.add_argument("--weights", default=default_format())
    parser.add_argument("--prefix-cache", choices=["off", "on", "both"], default="both")
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
