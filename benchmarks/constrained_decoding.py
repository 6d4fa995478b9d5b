"""Cost of constrained decoding: 16 concurrent streams with 0, 8 and 16 of them under a JSON
schema grammar (llguidance masks in the batched sampler), side by side in one process.

Every stream asks for the same number of tokens: free streams use ``ignore_eos``, the
constrained ones a schema that cannot be complete before ``max_tokens`` (an array of at
least 1000 small objects), so the batch keeps 16 rows throughout and the only difference
is the masking. Levels are interleaved over ``--reps`` rounds; the medians are reported,
as wall-clock tok/s and as tokens per CPU second of the process (``time.process_time``:
less sensitive than wall time to other work on a shared machine). First, the sampler alone
on a [16, vocab] batch: the engine thread's CPU time per step (``time.thread_time``) with 0,
8 and 16 rows masked, which is the part of a step that constraining adds to.

    .venv/bin/python benchmarks/constrained_decoding.py [--reps 3] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.engine.request import ChatMessage, Grammar, SamplingParams
from tokenspout.engine.sampler import RowContext, Uniforms

PROMPT = "List people with their name and age, as JSON."
STREAMS = 16
SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}


async def level(
    engine: LLMEngine, constrained: int, max_tokens: int, tag: str
) -> tuple[float, float]:
    """Aggregate output tok/s and tokens per CPU second of 16 streams, ``constrained`` of
    them under the schema."""
    prompt = engine.encode_chat([ChatMessage("user", PROMPT)])
    free = SamplingParams(max_tokens=max_tokens, temperature=0.8, ignore_eos=True, seed=1)
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    json_params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=1, grammar=grammar)

    async def one(i: int) -> int:
        params = json_params if i < constrained else free
        count = 0
        async for out in engine.generate(f"{tag}-{i}", prompt, params):
            count += out.num_tokens
            if out.finish_reason is not None:
                assert out.finish_reason == "length", out.finish_reason
        return count

    start, cpu_start = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(one(i) for i in range(STREAMS)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert all(c == max_tokens for c in counts), counts
    return sum(counts) / elapsed, sum(counts) / cpu


def sampler_cost(engine: LLMEngine, steps: int = 50) -> None:
    """Engine-thread CPU ms per step of the sampler (masks included) for 16 rows."""
    masks = engine.sampler.masks
    assert masks is not None
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    logits = torch.randn(STREAMS, masks.vocab_size, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.8, seed=1)] * STREAMS
    print("| constrained rows of 16 | sampler CPU ms per step (thread time) |\n|---|---|")
    for constrained in (0, 8, 16):
        matchers = [masks.matcher(grammar) if i < constrained else None for i in range(STREAMS)]
        contexts = [RowContext((), [], m) for m in matchers] if constrained else None
        gens = [Uniforms(i) for i in range(STREAMS)]
        start = time.thread_time()
        for _ in range(steps):
            tokens = engine.sampler(logits, params, gens, contexts).tokens
            for matcher, token in zip(matchers, tokens, strict=True):
                if matcher is not None and not matcher.is_stopped():
                    matcher.consume_token(token)
        ms = (time.thread_time() - start) / steps * 1000
        print(f"| {constrained} | {ms:.2f} |")


async def main(reps: int, max_tokens: int) -> None:
    engine = LLMEngine(None, max_num_seqs=STREAMS, prefix_cache=True)
    await engine.start()
    try:
        sampler_cost(engine)
        await level(engine, 16, 8, "warmup")
        results: dict[int, list[tuple[float, float]]] = {0: [], 8: [], 16: []}
        for rep in range(reps):
            for constrained in results:
                tok_s, tok_cpu = await level(
                    engine, constrained, max_tokens, f"r{rep}-{constrained}"
                )
                results[constrained].append((tok_s, tok_cpu))
                print(
                    f"rep {rep}: {constrained:2d} constrained: {tok_s:6.1f} tok/s, "
                    f"{tok_cpu:6.1f} tok/CPU-s",
                    flush=True,
                )
    finally:
        await engine.shutdown()
    base = statistics.median(r[0] for r in results[0])
    base_cpu = statistics.median(r[1] for r in results[0])
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print("| constrained rows of 16 | tok/s (median; runs) | vs 0 | tok per CPU-s | vs 0 |")
    print("|---|---|---|---|---|")
    for constrained, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        listed = ", ".join(f"{r[0]:.0f}" for r in runs)
        print(
            f"| {constrained} | {wall:.0f} ({listed}) | {wall / base:.2f}x | {cpu:.0f} | "
            f"{cpu / base_cpu:.2f}x |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    asyncio.run(main(args.reps, args.max_tokens))
