"""The Q4_1 / Q8_0 block kernel and GEMM against fbgemm's fp16 GEMM and fp32, per batch size.

    .venv/bin/python benchmarks/block_kernels.py [--threads 2] [--calls 200]

The default model's own weights (layer 0's fused matmuls, and the tied embedding as LM head),
each kernel on the same fp32 activations; median wall time per call over ``--calls`` calls,
the kernels interleaved per batch size so that the machine's load hits them alike. What
``KERNEL_ROWS`` (``Q4Linear``, ``Q8Linear``) and ``DecodeLayers.GEMM_ROWS`` are chosen from.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tokenspout.engine import block_kernels
from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.weights import Weights

ROWS = (1, 2, 4, 8, 16, 64)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = ModelFiles.resolve(None)
    w = Weights.load(files, files.metadata()["config"], "q4_1").tensors
    cases: list[tuple[str, block_kernels.Q4Linear | block_kernels.Q8Linear, torch.Tensor]] = []
    for name in ("layers.0.wqkv", "layers.0.wo", "layers.0.w13", "layers.0.w2"):
        kernel = block_kernels.Q4Linear(w[name + ".qs"], w[name + ".d"], w[name + ".m"])
        cases.append((name + " (Q4_1)", kernel, kernel.dequantize()))
    head = block_kernels.Q8Linear(w["embed.qs"], w["embed.d"])
    cases.append(("LM head (Q8_0)", head, block_kernels.dequantize_q8_0(head.qs, head.d)))
    print(f"\nµs per call, median of {args.calls}, {torch.get_num_threads()} threads\n")
    print("| weight [N, K] | rows | block kernel | GEMM | fbgemm fp16 | fp32 | fp16 / GEMM |")
    print("|---|---|---|---|---|---|---|")
    for name, kernel, dense in cases:
        packed = torch.ops.quantized.linear_prepack_fp16(dense, None)
        for rows in ROWS:
            x = torch.randn(rows, dense.shape[1])
            calls = max(10, args.calls // rows) if dense.shape[0] > 10000 else args.calls
            k = per_call_us(lambda kernel=kernel, x=x: kernel.kernel(x), calls)
            g = per_call_us(lambda kernel=kernel, x=x: kernel.gemm(x), calls)
            f16 = per_call_us(
                lambda x=x, packed=packed: torch.ops.quantized.linear_dynamic_fp16(x, packed),
                calls,
            )
            f32 = per_call_us(lambda x=x, dense=dense: x @ dense.T, calls)
            shape = f"{name} {list(dense.shape)}"
            print(
                f"| {shape} | {rows} | {k:.0f} | {g:.0f} | {f16:.0f} | {f32:.0f} | {f16 / g:.2f} |"
            )


if __name__ == "__main__":
    main()
