"""Prefill matmuls in bf16 (AMX) against the block GEMM: where ``Q4Linear.BF16_ROWS`` should
be, and what a long prompt's prefill gains. Alternating in one process.

    .venv/bin/python benchmarks/bf16_prefill.py [--rows 16,32,48,64,128,256] \\
        [--prompt 1000] [--rounds 8]

The default model in q4_1. First, layer 0's four matmuls (qkv, o, the fused gate/up with its
SwiGLU, down) at each of ``--rows`` rows of x, by the block GEMM and by the bf16 path (the
weights unpacked to bf16 for the call, then torch's GEMM): the median time of their sum, and
the ratio bf16 / blocks. Then a fresh ``--prompt``-token prompt's prefill in the engine's
256-token chunks (the model's forward, no server), ``BF16_ROWS`` unset and set in turn
(attention follows: bf16 where the matmuls are). On a CPU without AMX the bf16 path runs
too, on whatever GEMM torch has there, to show why it is not used.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tokenspout.engine import block_kernels
from tokenspout.engine.cpu_budget import usable_cpus
from tokenspout.engine.model_runner import ModelRunner, SeqChunk

CHUNK = 256  # the engine's default --max-prefill-tokens


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,32,48,64,128,256")
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    threads = usable_cpus()
    runner = ModelRunner(
        None, weights="q4_1", num_slots=1, max_model_len=args.prompt + 8, num_threads=threads
    )
    default = block_kernels.Q4Linear.BF16_ROWS
    print(
        f"AMX bf16: {block_kernels.amx_bf16()} (BF16_ROWS default {default}); "
        f"build {block_kernels.loaded_isa()}; {threads} threads\n"
    )
    _, attn, _, mlp = runner.model.layers[0]
    hidden, inter = attn.wqkv.k, mlp.w2.k
    print("layer 0's four matmuls: median time, bf16 / blocks\n")
    print("| rows | blocks | bf16 | ratio |")
    print("|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        x, act = torch.randn(rows, hidden), torch.randn(rows, inter)

        def layer(x: torch.Tensor = x, act: torch.Tensor = act) -> None:
            attn.wqkv(x)
            attn.wo(x)
            mlp.w13.swiglu(x)
            mlp.w2(act)

        times: dict[int | None, list[float]] = {None: [], 1: []}
        for r in range(args.rounds * 4):
            for setting in (None, 1) if r % 2 else (1, None):
                block_kernels.Q4Linear.BF16_ROWS = setting
                times[setting].append(timed(layer))
        blocks, bf16 = (statistics.median(times[s]) for s in (None, 1))
        print(f"| {rows} | {blocks * 1e3:.2f} ms | {bf16 * 1e3:.2f} ms | {bf16 / blocks:.3f} |")

    prompt = [1000 + (7 * i) % 20000 for i in range(args.prompt)]

    def prefill() -> None:
        for start in range(0, len(prompt), CHUNK):
            chunk = prompt[start : start + CHUNK]
            runner.forward([SeqChunk(0, chunk, start, prompt=True)])

    bf16_rows = default or 64
    runs: dict[int | None, list[float]] = {None: [], bf16_rows: []}
    for r in range(args.rounds + 1):
        for setting in (None, bf16_rows) if r % 2 else (bf16_rows, None):
            block_kernels.Q4Linear.BF16_ROWS = setting
            elapsed = timed(prefill)
            if r:  # the first round warms both up
                runs[setting].append(elapsed)
    blocks, bf16 = (statistics.median(runs[s]) for s in (None, bf16_rows))
    print(f"\na fresh {args.prompt}-token prompt, {CHUNK}-token chunks: median prefill")
    print(f"blocks {blocks * 1e3:.0f} ms ({', '.join(f'{t * 1e3:.0f}' for t in runs[None])})")
    print(
        f"bf16   {bf16 * 1e3:.0f} ms ({', '.join(f'{t * 1e3:.0f}' for t in runs[bf16_rows])})"
        f"; ratio {bf16 / blocks:.3f}"
    )


if __name__ == "__main__":
    main()
