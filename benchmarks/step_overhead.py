"""What a batch-1 decode step costs around its C call, in one process.

    .venv/bin/python benchmarks/step_overhead.py [--steps 400] [--threads 2]

Alternating step by step, so that the host's noise falls on both alike:
- ``ModelRunner.forward`` against the bare C call (``DecodeLayers``'s ``decode_layers`` with
  the same arguments, packed as ctypes arrays): the difference is forward's own Python;
- then, right after each forward, the engine's ``Sampler`` at temperature 0.8 (no top-k or
  top-p), and the same call again at once: the first pays for torch's code and data having
  gone cold while ~100 MB of weights streamed through the caches.

Medians in µs. Python and torch work between steps adds to every token at batch 1, and
right after a step it runs cold: what was measured before the ctypes and drawn-ahead
changes is in RESULTS.md (issue 14, sixth session).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from tokenspout.engine.model_runner import ModelRunner, SeqChunk
from tokenspout.engine.request import SamplingParams
from tokenspout.engine.sampler import Sampler, Uniforms

CONTEXT = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runner = ModelRunner(
        None, weights="q4_1", num_slots=1, max_model_len=CONTEXT + 256, num_threads=args.threads
    )
    layers, model, cache = runner.model.decode_layers, runner.model, runner.cache
    if layers is None:
        raise SystemExit("this model has no one-call decode step")
    runner.forward([SeqChunk(0, list(range(1000, 1000 + CONTEXT)), 0)])

    def bare(chunk: SeqChunk) -> torch.Tensor:
        row = ctypes.c_int64 * 1
        logits = torch.empty(1, layers.vocab)
        layers._call(
            row(chunk.token_ids[0]), 1, layers.gemm_rows, layers.int8, *layers._embed_blocks,
            row(chunk.slot), row(chunk.start_pos), model.rope.cos.data_ptr(),
            model.rope.sin_signed.data_ptr(),
            layers._layers, *layers._rest, cache.k.data_ptr(), cache.v.data_ptr(),
            cache.k.shape[1], cache.k.shape[3], logits.data_ptr(),
        )  # fmt: skip
        return logits

    def forward(chunk: SeqChunk) -> torch.Tensor:
        return runner.forward([chunk])

    sampler, params, uniforms = Sampler(), [SamplingParams(temperature=0.8)], [Uniforms(0)]
    steps: dict[str, list[float]] = {"forward": [], "bare C call": []}
    sampling: dict[str, list[float]] = {"right after the step": [], "again at once": []}
    for n in range(args.steps):
        chunk = SeqChunk(0, [100 + n % 50], CONTEXT + n % 200)
        name, step = (("forward", forward), ("bare C call", bare))[n % 2]
        start = time.perf_counter()
        logits = step(chunk)
        steps[name].append(time.perf_counter() - start)
        for when in sampling:
            start = time.perf_counter()
            sampler(logits, params, uniforms)
            sampling[when].append(time.perf_counter() - start)
    median = {k: statistics.median(v) * 1e6 for k, v in {**steps, **sampling}.items()}
    print(f"batch 1, {args.steps // 2} steps each way, medians:\n")
    print("| | µs |\n|---|---|")
    for name, us in median.items():
        print(f"| {name} | {us:.0f} |")
    print(f"| forward's own Python | {median['forward'] - median['bare C call']:.0f} |")


if __name__ == "__main__":
    main()
