"""The block kernels' GEMM in each build this CPU runs (AVX2: fp32; AVX-512 VNNI: int16),
side by side on the same Q4_1 weights and activations.

    .venv/bin/python benchmarks/gemm_builds.py [--rounds 15] [--calls 5]

SmolLM2-135M's layer shapes (fused q/k/v [960, 576], fused gate/up [3072, 576], down
[576, 1536]; random weights quantised to Q4_1) at 16 rows (a batch-16 decode step) and 256
(a prefill chunk). Both builds are loaded in one process (``TOKENSPOUT_KERNELS`` picks the
build a layer binds); each round times ``--calls`` calls of each, the two in turn. Reports
the median per call, GFLOP/s and the ratio (AVX-512 / AVX2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tokenspout.engine import block_kernels

SHAPES = ((960, 576), (3072, 576), (576, 1536))  # (N, K)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    builds = block_kernels.supported_isas()
    if len(builds) < 2:
        raise SystemExit(f"this CPU runs only {builds}: nothing to compare")
    gen = torch.Generator().manual_seed(0)
    print("| N x K | rows | " + " | ".join(builds) + " | ratio |")
    print("|---|---|" + "---|" * len(builds) + "---|")
    for n, k in SHAPES:
        blocks = block_kernels.quantize_q4_1(torch.randn(n, k, generator=gen))
        linears = {}
        for build in builds:
            os.environ[block_kernels.ISA_VARIABLE] = build
            linears[build] = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
        for rows in (16, 256):
            x = torch.randn(rows, k, generator=gen)
            times: dict[str, list[float]] = {build: [] for build in builds}
            for r in range(args.rounds):
                for build in builds if r % 2 else builds[::-1]:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        linears[build].gemm(x)
                    times[build].append((time.perf_counter() - start) / args.calls)
            med = {b: statistics.median(t) for b, t in times.items()}
            cells = [
                f"{med[b] * 1e3:.2f} ms, {2 * rows * n * k / med[b] / 1e9:.0f} GFLOP/s"
                for b in builds
            ]
            print(
                f"| {n} x {k} | {rows} | "
                + " | ".join(cells)
                + f" | {med[builds[-1]] / med[builds[0]]:.2f} |"
            )


if __name__ == "__main__":
    main()
