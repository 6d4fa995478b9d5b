"""Where a build's ``DecodeLayers.GEMM_ROWS`` should be: decode steps of B sequences by
the block kernels or by the GEMMs, alternating in one process.

    .venv/bin/python benchmarks/gemm_rows.py [--batches 7,8,9,10] [--thresholds 8,11] \\
        [--rounds 8] [--steps 30]

The default model in this CPU's default format (q4_1) and build; B sequences of a 128-token
prompt, then per round ``--steps`` decode steps under each ``GEMM_ROWS`` value in turn (the
order alternating). A batch below a threshold runs by the kernels, at or above it by the
GEMMs, so two thresholds on either side of B compare the two paths. Reports each value's
median step time and its ratio to the first value's.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenspout.engine import block_kernels
from tokenspout.engine.model_runner import ModelRunner, SeqChunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="7,8,9,10")
    parser.add_argument("--thresholds", default="8,11")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    thresholds = [int(t) for t in args.thresholds.split(",")]
    runner = ModelRunner(None, num_slots=max(batches), max_model_len=128 + args.steps + 8)
    decoder = runner.model.decode_layers
    assert decoder is not None, "the q4_1 weights' one-call decode step"
    prompt = [1000 + (7 * i) % 20000 for i in range(128)]
    first = 0
    for slot in range(max(batches)):
        first = int(runner.forward([SeqChunk(slot, prompt, 0)])[0].argmax())
    build = block_kernels.loaded_isa()
    print(f"build {build}; median step time, ratio to GEMM_ROWS={thresholds[0]}\n")
    print("| batch | " + " | ".join(f"GEMM_ROWS={t}" for t in thresholds) + " |")
    print("|---|" + "---|" * len(thresholds))
    for batch in batches:
        medians: dict[int, list[float]] = {t: [] for t in thresholds}
        for r in range(args.rounds):
            for t in thresholds if r % 2 else thresholds[::-1]:
                decoder.gemm_rows = t
                ids, times = [first] * batch, []
                for n in range(args.steps):  # the same positions every round
                    start = time.perf_counter()
                    chunks = [SeqChunk(s, [ids[s]], 128 + n) for s in range(batch)]
                    logits = runner.forward(chunks)
                    times.append(time.perf_counter() - start)
                    ids = logits.argmax(-1).tolist()
                medians[t].append(statistics.median(times))
        base = statistics.median(medians[thresholds[0]])
        cells = [
            f"{statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / base:.3f})"
            for v in medians.values()
        ]
        print(f"| {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
