"""A decode step on Q4_1 weights in 2 MB pages (as the engine loads them) against the same
weights in 4 KB pages, in one process.

    .venv/bin/python benchmarks/weights_huge_pages.py [--batches 1,2,16] [--steps 200] \\
        [--threads 2]

Two runners load the model: one as the engine does (``weights.in_huge_pages``), one with
every tensor cloned by torch's allocator instead (4 KB pages where THP's mode is
``madvise``). Their decode steps alternate, which goes first alternating too, so that the
host's noise falls on both alike. Reports the median and best step time of each, per batch
size, and how much of each process is in huge pages.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decode_step_profile import decode_chunks
from tokenspout.engine import weights
from tokenspout.engine.model_runner import ModelRunner, SeqChunk

CONTEXT = 128


def anon_huge_mb() -> int:
    """This process's anonymous memory in transparent huge pages, in MB."""
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) >> 10
    return 0


def in_small_pages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    def load() -> ModelRunner:
        return ModelRunner(
            None, weights="q4_1", num_slots=max(batches), max_model_len=CONTEXT + 128,
            num_threads=args.threads,
        )  # fmt: skip

    runners = {"2 MB": load()}
    huge = anon_huge_mb()
    weights.in_huge_pages = in_small_pages  # type: ignore[assignment]
    runners["4 KB"] = load()
    print(f"anonymous huge pages: {huge} MB after the first load, {anon_huge_mb()} MB after both")
    for runner in runners.values():
        for slot in range(max(batches)):
            runner.forward([SeqChunk(slot, list(range(1000, 1000 + CONTEXT)), 0)])
    print(f"\ndecode step, {CONTEXT}-token contexts, {args.steps} steps each, alternating\n")
    print("| batch | 4 KB median | 2 MB median | ratio | 4 KB best | 2 MB best |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        times: dict[str, list[float]] = {name: [] for name in runners}
        for step in range(args.steps):
            order = list(runners.items())
            for name, runner in order if step % 2 else order[::-1]:
                start = time.perf_counter()
                runner.forward(decode_chunks(batch, CONTEXT, step))
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        best = {k: min(v) * 1e3 for k, v in times.items()}
        print(f"| {batch} | {med['4 KB']:.2f} ms | {med['2 MB']:.2f} ms | "
              f"{med['2 MB'] / med['4 KB']:.3f} | {best['4 KB']:.2f} ms | {best['2 MB']:.2f} ms |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
