"""A decode step with this checkout's C kernels against another commit's, in one process.

    .venv/bin/python benchmarks/decode_step_ab.py [--base HEAD] [--batches 1,4,8,16] \\
        [--steps 100] [--threads 2] [--context 128]

Both builds of ``engine/block_kernels.c`` run ``decode_layers`` on the same loaded model,
alternating step by step (which goes first alternates too), so that the host's noise, which
moves separate runs by ±15 % here, falls on both alike. The base's source must take the same
``decode_layers`` arguments, and read the weights' block scales as fp16 (builds from the
commit that made them fp16 on; ``kv_cache_dtype.py`` shows how to give older ones fp32
copies). Reports the median and best step time of each, per batch size.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from decode_step_profile import decode_chunks
from tokenspout.engine import block_kernels
from tokenspout.engine.model_runner import ModelRunner, SeqChunk


def build_base(rev: str, out: Path) -> ctypes.CDLL:
    """Compile ``rev``'s block_kernels.c with this checkout's flags and load it."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/tokenspout/engine/block_kernels.c"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    (out / "base.c").write_text(source)
    subprocess.run(
        ["cc", *block_kernels._FLAGS, str(out / "base.c"), "-o", str(out / "base.so")],
        check=True,
    )
    return ctypes.CDLL(str(out / "base.so"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=128, help="tokens before each step")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lib = block_kernels._library()
    if lib is None:
        raise SystemExit("the C kernels do not run on this machine")
    runner = ModelRunner(
        None, weights="q4_1", num_slots=max(batches), max_model_len=args.context + 128,
        num_threads=args.threads,
    )  # fmt: skip
    layers = runner.model.decode_layers
    if layers is None:
        raise SystemExit("this model has no one-call decode step")
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.base, Path(tmp)).decode_layers
    ours = lib.decode_layers
    base.argtypes, base.restype = ours.argtypes, ours.restype
    for slot in range(max(batches)):
        runner.forward([SeqChunk(slot, list(range(1000, 1000 + args.context)), 0)])

    def step_with(call: ctypes._CFuncPtr) -> Callable[[int, int], None]:
        def step(batch: int, n: int) -> None:
            layers._call = call
            runner.forward(decode_chunks(batch, args.context, n))

        return step

    print(f"decode step, {args.context}-token contexts, {args.steps} steps each, alternating\n")
    print_header(args.base, "this")
    for batch in batches:
        times = alternate({args.base: step_with(base), "this": step_with(ours)}, batch, args.steps)
        print_row(batch, times)


def alternate(
    steps: dict[str, Callable[[int, int], object]], batch: int, count: int
) -> dict[str, list[float]]:
    """Time ``count`` calls of each ``steps[name](batch, n)``, the variants alternating call
    by call and which goes first alternating too; seconds per call, by name."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for n in range(count):
        order = list(steps.items())
        for name, step in order if n % 2 else order[::-1]:
            start = time.perf_counter()
            step(batch, n)
            times[name].append(time.perf_counter() - start)
    return times


def print_header(base: str, this: str) -> None:
    print(f"| batch | {base} median | {this} median | ratio | {base} best | {this} best |")
    print("|---|---|---|---|---|---|")


def print_row(batch: int, times: dict[str, list[float]]) -> None:
    """One table row: the median and best of the two variants, the ratio second / first."""
    a, b = times.values()
    med = [statistics.median(a) * 1e3, statistics.median(b) * 1e3]
    best = [min(a) * 1e3, min(b) * 1e3]
    print(f"| {batch} | {med[0]:.2f} ms | {med[1]:.2f} ms | {med[1] / med[0]:.3f} | "
          f"{best[0]:.2f} ms | {best[1]:.2f} ms |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
