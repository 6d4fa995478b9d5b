"""A decode step on the fp16 KV cache against another commit's step on an fp32 one, in one process.

    .venv/bin/python benchmarks/kv_cache_dtype.py --base REV [--batches 1,16] \\
        [--contexts 32,128,512] [--steps 60] [--threads 2]

``REV``'s ``engine/block_kernels.c`` must be one whose ``decode_layers`` reads an fp32 cache
(7c7ffb5 and before); such builds also read the weights' block scales as fp32, so the base
gets fp32 copies of them (the same values). Both builds run ``decode_layers`` by bare C calls
on the same loaded model, alternating step by step (which goes first alternates too), so
that the host's noise falls on both alike: this checkout's on the runner's fp16 cache, the
base's on an fp32 copy of it. Every slot first gets a prompt as long as the context; the
steps then decode at that context. Reports the median and best step time of each, per
context and batch size, and how many rows' top-1 tokens agree (the prompts are runs of
consecutive token ids, nonsense whose next token can be a near tie; the quality check on real
prompts is in the tests).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from decode_step_ab import alternate, build_base, print_header, print_row
from tokenspout.engine import block_kernels
from tokenspout.engine.model_runner import ModelRunner, SeqChunk


class Fp32Scales:
    """``decode_layers``' weight arguments with fp32 copies of every block scale and minimum,
    as builds before the fp16 scales read them (the copies kept alive here)."""

    def __init__(self, layers: block_kernels.DecodeLayers):
        self._copies: list[torch.Tensor] = []
        pointers: list[int] = []
        count = len(layers._linears)
        # per layer as DecodeLayers packs them: attn_norm, wqkv, wo, ffn_norm, w13, w2
        for n, (wqkv, wo, _, w13, w2) in enumerate(layers._linears):  # _: ffn_norm
            pointers.append(layers._norms[n].data_ptr())
            pointers += self._blocks(wqkv) + self._blocks(wo)
            pointers.append(layers._norms[count + n].data_ptr())
            pointers += self._blocks(w13) + self._blocks(w2)
        self.layers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.embed = (layers._embed.qs.data_ptr(), self._fp32(layers._embed.d))
        final, _, _, *shape = layers._rest[1:]
        head = (layers._head.qs.data_ptr(), self._fp32(layers._head.d))
        self.rest = (layers._rest[0], final, *head, *shape)

    def _blocks(self, linear: block_kernels.Q4Linear) -> list[int]:
        qs, *scales = linear.blocks
        return [qs.data_ptr(), *(self._fp32(t) for t in scales)]

    def _fp32(self, t: torch.Tensor) -> int:
        self._copies.append(t.float().contiguous())
        return self._copies[-1].data_ptr()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--contexts", default="32,128,512")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    lib = block_kernels._library()
    if lib is None:
        raise SystemExit("the C kernels do not run on this machine")
    slots = max(batches)
    runner = ModelRunner(
        None, weights="q4_1", num_slots=slots, max_model_len=max(contexts) + args.steps + 1,
        num_threads=args.threads,
    )  # fmt: skip
    layers, model, cache = runner.model.decode_layers, runner.model, runner.cache
    if layers is None:
        raise SystemExit("this model has no one-call decode step")
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.base, Path(tmp)).decode_layers
    # the base's decode_layers predates the int8 flag (the 4th argument)
    own_types = lib.decode_layers.argtypes
    base.argtypes, base.restype = own_types[:3] + own_types[4:], lib.decode_layers.restype

    fp32 = Fp32Scales(layers)

    def call(
        fn: ctypes._CFuncPtr, k: torch.Tensor, v: torch.Tensor, context: int
    ) -> Callable[[int, int], torch.Tensor]:
        """A step of ``batch`` slots decoding at position ``context + n``, by ``fn`` (the
        base with the fp32 scales)."""
        weights = (
            (fp32.embed, fp32.layers, fp32.rest)
            if fn is base
            else (layers._embed_blocks, layers._layers, layers._rest)
        )

        def step(batch: int, n: int) -> torch.Tensor:
            rows = ctypes.c_int64 * batch
            logits = torch.empty(batch, layers.vocab)
            status = fn(
                rows(*(100 + s for s in range(batch))), batch, layers.gemm_rows,
                *(() if fn is base else (layers.int8,)), *weights[0], rows(*range(batch)),
                rows(*[context + n] * batch),
                model.rope.cos.data_ptr(), model.rope.sin_signed.data_ptr(), weights[1],
                *weights[2], k.data_ptr(), v.data_ptr(), slots, k.shape[3],
                logits.data_ptr(),
            )  # fmt: skip
            assert status == 0
            return logits

        return step

    print(f"decode step, {args.steps} steps each, alternating; the base on an fp32 cache\n")
    for context in contexts:
        for slot in range(slots):
            prompt = list(range(1000 + slot, 1000 + slot + context))
            runner.forward([SeqChunk(slot, prompt, 0)])
        k32, v32 = cache.k.float(), cache.v.float()
        ours = call(lib.decode_layers, cache.k, cache.v, context)
        theirs = call(base, k32, v32, context)
        print(f"context {context}\n")
        print_header(f"{args.base} fp32", "fp16")
        for batch in batches:
            times = alternate({"fp32": theirs, "fp16": ours}, batch, args.steps)
            print_row(batch, times)
            same = int((ours(batch, 0).argmax(-1) == theirs(batch, 0).argmax(-1)).sum())
            print(f"\nrows whose top-1 token agrees: {same} of {batch}\n", flush=True)


if __name__ == "__main__":
    main()
