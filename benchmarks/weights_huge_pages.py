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
from collections.abc import Callable

import torch

from decode_step_ab import alternate, print_header, print_row
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

    def step_on(runner: ModelRunner) -> Callable[[int, int], object]:
        return lambda batch, n: runner.forward(decode_chunks(batch, CONTEXT, n))

    print(f"\ndecode step, {CONTEXT}-token contexts, {args.steps} steps each, alternating\n")
    print_header("4 KB", "2 MB")
    for batch in batches:
        steps = {"4 KB": step_on(runners["4 KB"]), "2 MB": step_on(runners["2 MB"])}
        print_row(batch, alternate(steps, batch, args.steps))


if __name__ == "__main__":
    main()
