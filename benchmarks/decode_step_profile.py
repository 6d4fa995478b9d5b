"""Decode-step time of ModelRunner per weight format and batch size, and where it goes.

    .venv/bin/python benchmarks/decode_step_profile.py [--steps 40] [--context 128] \
        [--formats q4_1,fp16] [--batches 1,2,4,8,16] [--threads N] [--no-profile] \
        [--gemm-rows 8,17]

Every slot first gets a ``--context``-token prompt; then a decode step for ``batch`` slots
(each feeding one token at the next position) is timed ``--steps`` times, formats side by
side in one run (the machine is shared: compare ratios, not absolute numbers), then a
256-token prefill in one chunk (best of 3). A ``torch.profiler`` table of the top ops
follows for this CPU's default format at batch 1 and 16, those of them in ``--batches``.
``--gemm-rows`` times q4_1 once per value of its decoder's ``gemm_rows`` (the batch size from
which its one-call step runs GEMMs rather than the int16 kernels; 17: kernels up to 16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenspout.engine import block_kernels
from tokenspout.engine.block_kernels import DecodeLayers
from tokenspout.engine.model_runner import ModelRunner, SeqChunk
from tokenspout.engine.weights import default_format

BATCHES = (1, 4, 16)
FORMATS = ("q4_1", "int8", "fp16", "bf16", "fp32")
SEED = 0
PREFILL = 256


def decode_chunks(batch: int, context: int, step: int) -> list[SeqChunk]:
    # Positions advance a little each step, as in real decoding; wrap to stay in the slot.
    pos = context + step % 64
    return [SeqChunk(slot, [100 + slot], pos) for slot in range(batch)]


def time_steps(runner: ModelRunner, batch: int, context: int, steps: int) -> float:
    """Median wall time of one decode step, in ms."""
    for step in range(3):  # warm-up
        runner.forward(decode_chunks(batch, context, step))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        runner.forward(decode_chunks(batch, context, step))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def prefill_ms(runner: ModelRunner) -> float:
    """Best of 3: one PREFILL-token prompt in one chunk."""
    prompt = list(range(2000, 2000 + PREFILL))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        runner.forward([SeqChunk(0, prompt, 0)])
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def profile_table(runner: ModelRunner, batch: int, context: int, rows: int = 12) -> str:
    for step in range(3):
        runner.forward(decode_chunks(batch, context, step))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(10):
            runner.forward(decode_chunks(batch, context, step))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="a fixed thread count (default: the engine's own, which drops to 1 while other "
        "processes compete for the cores)",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--gemm-rows", default=None, help="default: the loaded build's")
    args = parser.parse_args()
    formats = args.formats.split(",")
    own = DecodeLayers.GEMM_ROWS[str(block_kernels.loaded_isa())]
    gemm_rows = [int(r) for r in (args.gemm_rows or str(own)).split(",")]
    # (label, format, GEMM_ROWS): q4_1 once per --gemm-rows value
    variants = [
        (f"{fmt} (GEMMs from {r})" if fmt == "q4_1" and len(gemm_rows) > 1 else fmt, fmt, r)
        for fmt in formats
        for r in (gemm_rows if fmt == "q4_1" else gemm_rows[:1])
    ]
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(SEED)
    max_len = max(args.context + 128, PREFILL + 1)
    results: dict[str, dict[int, float]] = {}
    runners: dict[str, ModelRunner] = {}
    for fmt in formats:
        runner = ModelRunner(
            None,
            weights=fmt,
            num_slots=max(batches),
            max_model_len=max_len,
            num_threads=args.threads,
        )
        prompt = list(range(1000, 1000 + args.context))
        for slot in range(max(batches)):
            runner.forward([SeqChunk(slot, prompt, 0)])
        runners[fmt] = runner
    # Interleave formats per batch size so that noise from other jobs hits all of them alike.
    for batch in batches:
        for label, fmt, rows in variants:
            decoder = runners[fmt].model.decode_layers
            if decoder is not None:
                decoder.gemm_rows = rows
            results.setdefault(label, {})[batch] = time_steps(
                runners[fmt], batch, args.context, args.steps
            )
    for runner in runners.values():
        if runner.model.decode_layers is not None:
            runner.model.decode_layers.gemm_rows = gemm_rows[0]
    print(
        f"\nDecode step, context {args.context} tokens, median of {args.steps} steps, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| weights | " + " | ".join(f"batch {b}" for b in batches) + " | prefill 256 |")
    print("|---|" + "---|" * (len(batches) + 1))
    for label, fmt, _ in variants:
        cells = [
            f"{results[label][b]:.1f} ms ({b / results[label][b] * 1e3:.0f} tok/s)" for b in batches
        ]
        cells.append(f"{prefill_ms(runners[fmt]):.0f} ms")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if not args.no_profile and default_format() in runners:
        for batch in (b for b in (1, 16) if b in batches):  # only slots that were filled
            print(f"\nProfile: {default_format()} (this CPU's default), batch {batch}, 10 steps\n")
            print(profile_table(runners[default_format()], batch, args.context))


if __name__ == "__main__":
    main()
