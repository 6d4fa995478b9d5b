"""ModelRunner on the real default model: greedy ids against transformers, and the
equivalences the engine relies on (batched decode, chunked prefill, slot prefix copies).

Reference ids come from scripts/make_reference_greedy.py (transformers, fp32, same GGUF).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tokenspout.engine import block_kernels
from tokenspout.engine.model_runner import ModelRunner, SeqChunk
from tokenspout.engine.weights import default_format

# Model reference checks on the real weights: `make test-slow` (and CI, after `make test`).
pytestmark = pytest.mark.slow

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_greedy.json").read_text())
CASES = REFERENCE["cases"]


@pytest.fixture(scope="module")
def fp32() -> ModelRunner:
    return ModelRunner(None, weights="fp32", num_slots=6, max_model_len=256)


@pytest.fixture(scope="module")
def int8() -> ModelRunner:
    return ModelRunner(None, weights="int8", num_slots=6, max_model_len=256)


@pytest.fixture(scope="module")
def fp16() -> ModelRunner:
    return ModelRunner(None, weights="fp16", num_slots=6, max_model_len=256)


@pytest.fixture(scope="module")
def q4_1() -> ModelRunner:
    if not block_kernels.available():
        pytest.skip("the block kernels need AVX2 and a C compiler")
    # a slot for each of a GEMM step's rows (test_q4_1_batched_decode_agrees_with_reference_top1)
    slots = block_kernels.DecodeLayers.GEMM_ROWS[str(block_kernels.loaded_isa())]
    return ModelRunner(None, weights="q4_1", num_slots=slots, max_model_len=256)


def greedy(runner: ModelRunner, prompt: Sequence[int], steps: int, slot: int = 0) -> list[int]:
    logits = runner.forward([SeqChunk(slot, prompt, 0)])
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + steps):
        out.append(int(logits[0].argmax()))
        logits = runner.forward([SeqChunk(slot, out[-1:], pos)])
    return out


def case_id(case: dict) -> str:
    return case["chat"][0]["content"][:20] if "chat" in case else case["text"][:20]


def test_api_attributes(fp32: ModelRunner) -> None:
    assert fp32.model_id == "SmolLM2-135M-Instruct"
    assert (fp32.num_slots, fp32.max_model_len, fp32.vocab_size) == (6, 256, 49152)
    assert fp32.tokenizer.eos_token_ids == frozenset({2})


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_greedy_matches_transformers(fp32: ModelRunner, case: dict) -> None:
    # Same weights, same fp32 arithmetic up to summation order inside kernels: all 32 tokens
    # match exactly. (The smallest top-2 margin along these references is stored with them;
    # a change that makes a step differ by ulps would only flip a near-tie there.)
    assert greedy(fp32, case["prompt_ids"], len(case["greedy_ids"])) == case["greedy_ids"]


def test_default_format_follows_the_cpu() -> None:
    if block_kernels.available():
        expected = "q4_1"
    else:
        expected = "int8" if torch.cpu._is_avx512_bf16_supported() else "fp16"
    assert default_format() == expected


@pytest.mark.parametrize("fmt", ["int8", "fp16", "q4_1"])
def test_capital_of_france_mentions_paris(fmt: str, request: pytest.FixtureRequest) -> None:
    from tokenspout.engine.request import ChatMessage

    runner: ModelRunner = request.getfixturevalue(fmt)
    tok = runner.tokenizer
    prompt = tok.encode(tok.render_chat([ChatMessage("user", "What is the capital of France?")]))
    assert "Paris" in tok.decode(greedy(runner, prompt, 12))


@pytest.mark.parametrize(("fmt", "floor"), [("int8", 0.9), ("fp16", 0.95), ("q4_1", 0.95)])
def test_quantised_weights_agree_with_reference_top1(
    fmt: str, floor: float, request: pytest.FixtureRequest
) -> None:
    # int8 weights and bf16 activations move logits by ~1%, so once one token differs the
    # continuations part ways. Teacher-forcing on the reference ids measures agreement per
    # step instead: the argmax must equal the reference's next token nearly always.
    # Measured over these 160 steps: int8 156, fp16 (fp32 activations) 160, q4_1 160 (the
    # GGUF's own blocks; activations rounded to int16 per block in decode steps of <= 2 rows).
    runner: ModelRunner = request.getfixturevalue(fmt)
    agree = total = 0
    for case in CASES:
        prompt, ref = case["prompt_ids"], case["greedy_ids"]
        logits = runner.forward([SeqChunk(0, prompt, 0)])
        for i, token in enumerate(ref):
            agree += int(logits[0].argmax()) == token
            total += 1
            logits = runner.forward([SeqChunk(0, [token], len(prompt) + i)])
    assert agree / total >= floor, f"{fmt} top-1 agreement {agree}/{total}"


def test_q4_1_prompts_in_bf16_agree_with_reference_top1(
    q4_1: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the CPU has AMX, prompt chunks of BF16_ROWS tokens or more run their matmuls and
    # attention in bf16. Here every chunk does (BF16_ROWS = 1), first with the usual decode
    # steps after the prompt, then with every step recomputed as a whole prompt, all in bf16.
    # Measured: 160 and 158 of 160.
    from tokenspout.engine.request import ChatMessage

    monkeypatch.setattr(block_kernels.Q4Linear, "BF16_ROWS", 1)
    agree = whole = total = 0
    for case in CASES:
        prompt, ref = case["prompt_ids"], case["greedy_ids"]
        logits = q4_1.forward([SeqChunk(0, prompt, 0)])
        for i, token in enumerate(ref):
            agree += int(logits[0].argmax()) == token
            steps = prompt + ref[:i]
            whole += int(q4_1.forward([SeqChunk(1, steps, 0)])[0].argmax()) == token
            total += 1
            logits = q4_1.forward([SeqChunk(0, [token], len(prompt) + i)])
    assert agree / total >= 0.95, f"q4_1 bf16 prompts: top-1 agreement {agree}/{total}"
    assert whole / total >= 0.95, f"q4_1 bf16 whole prompts: top-1 agreement {whole}/{total}"
    tok = q4_1.tokenizer
    prompt = tok.encode(tok.render_chat([ChatMessage("user", "What is the capital of France?")]))
    assert "Paris" in tok.decode(greedy(q4_1, prompt, 12))


def test_q4_1_batched_decode_agrees_with_reference_top1(q4_1: ModelRunner) -> None:
    # Decode steps of GEMM_ROWS or more tokens run as GEMMs (fp32 on the dequantised blocks,
    # or int8 x with AVX-512 VNNI), not the kernels: the same teacher-forced check, every
    # case in one batch (the first ones twice, to fill it). Measured: 160 of 160 with fp32
    # (AVX2) or int16 x; 154 of 160 with int8 x.
    rows = max(len(CASES), block_kernels.DecodeLayers.GEMM_ROWS[str(block_kernels.loaded_isa())])
    cases = [CASES[i % len(CASES)] for i in range(rows)]
    logits = torch.cat(
        [q4_1.forward([SeqChunk(s, c["prompt_ids"], 0)]) for s, c in enumerate(cases)]
    )
    agree = total = 0
    for i in range(len(CASES[0]["greedy_ids"])):
        for row, case in enumerate(cases[: len(CASES)]):
            agree += int(logits[row].argmax()) == case["greedy_ids"][i]
            total += 1
        chunks = [
            SeqChunk(s, [c["greedy_ids"][i]], len(c["prompt_ids"]) + i) for s, c in enumerate(cases)
        ]
        logits = q4_1.forward(chunks)
    assert agree / total >= 0.95, f"q4_1 batched top-1 agreement {agree}/{total}"


def test_a_prompt_token_in_a_batched_decode_step_picks_the_first_token_as_alone(
    q4_1: ModelRunner,
) -> None:
    # A prompt whose rest came from the prefix cache runs its last token as a one-token
    # chunk, batched with decode steps. Its row picks the answer's first token, and int8 x
    # (the AVX-512 build's decode GEMMs) moved this one from "The" to "L'": such a step keeps
    # int16 x. Every row here is that prompt, at a batch the GEMMs run.
    from tokenspout.engine.request import ChatMessage

    tok = q4_1.tokenizer
    prompt = tok.encode(tok.render_chat([ChatMessage("user", "What is the capital of France?")]))
    alone = int(q4_1.forward([SeqChunk(0, prompt, 0)])[0].argmax())
    rows = q4_1.num_slots  # GEMM_ROWS: the fixture's
    for slot in range(rows):
        q4_1.forward([SeqChunk(slot, prompt[:-1], 0, prompt=True)])
    chunks = [SeqChunk(slot, prompt[-1:], len(prompt) - 1, prompt=True) for slot in range(rows)]
    firsts = q4_1.forward(chunks).argmax(-1).tolist()
    assert tok.decode([alone]) == "The"
    assert firsts == [alone] * rows


@pytest.mark.parametrize("slots", [[0, 1, 2], [5, 1, 3]], ids=["consecutive", "scattered"])
@pytest.mark.parametrize("fmt", ["fp32", "int8", "fp16", "q4_1"])
def test_batched_decode_equals_each_alone(
    fmt: str, slots: list[int], request: pytest.FixtureRequest
) -> None:
    runner: ModelRunner = request.getfixturevalue(fmt)
    prompts = [c["prompt_ids"] for c in CASES[: len(slots)]]  # different lengths: a ragged batch
    firsts = [
        int(runner.forward([SeqChunk(s, p, 0)])[0].argmax())
        for s, p in zip(slots, prompts, strict=True)
    ]
    chunks = [SeqChunk(s, [t], len(p)) for s, p, t in zip(slots, prompts, firsts, strict=True)]
    batched = runner.forward(chunks)
    alone = torch.cat([runner.forward([c]) for c in chunks])
    # bf16 activations (int8) and fbgemm's blocking by batch size (fp16) change the rounding.
    # q4_1: decode steps of 3 rows and of 1 both go to the one-call step's int16 kernels,
    # whose rows do not depend on each other or on their order: the same bits.
    tolerance = {"fp32": 1e-4, "int8": 0.15, "fp16": 0.01, "q4_1": 0.0}[fmt]
    assert batched.shape == (len(slots), runner.vocab_size)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=tolerance, rtol=0)
    assert batched.argmax(-1).tolist() == alone.argmax(-1).tolist()


@pytest.mark.parametrize("fmt", ["fp32", "q4_1"])
def test_chunked_prefill_equals_one_shot(fmt: str, request: pytest.FixtureRequest) -> None:
    # The first chunk runs attention's causal mode, the later ones an additive mask: the
    # same visible keys either way. PyTorch's attention rounds differently for other query
    # counts (~1e-7); q4_1's LM head rounds its input to int16 per block, which can carry
    # that to ~1e-2 in the logits (7.5e-3 measured), as in test_mixed_prefill_and_decode_step.
    runner: ModelRunner = request.getfixturevalue(fmt)
    tolerance = {"fp32": 1e-4, "q4_1": 0.02}[fmt]
    prompt = CASES[1]["prompt_ids"]
    one_shot = runner.forward([SeqChunk(0, prompt, 0)])
    cuts = [0, 7, 20, len(prompt)]
    for a, b in itertools.pairwise(cuts):
        chunked = runner.forward([SeqChunk(1, prompt[a:b], a)])
    torch.testing.assert_close(chunked, one_shot, atol=tolerance, rtol=0)
    nxt = int(one_shot[0].argmax())
    assert int(chunked[0].argmax()) == nxt
    step = runner.forward([SeqChunk(0, [nxt], len(prompt)), SeqChunk(1, [nxt], len(prompt))])
    torch.testing.assert_close(step[0], step[1], atol=tolerance, rtol=0)


@pytest.mark.parametrize("fmt", ["fp32", "q4_1"])
def test_mixed_prefill_and_decode_step(fmt: str, request: pytest.FixtureRequest) -> None:
    runner: ModelRunner = request.getfixturevalue(fmt)
    a, b = CASES[0]["prompt_ids"], CASES[3]["prompt_ids"]
    first = int(runner.forward([SeqChunk(0, a, 0)])[0].argmax())
    decode_alone = runner.forward([SeqChunk(0, [first], len(a))])
    prefill_alone = runner.forward([SeqChunk(2, b, 0)])
    # Prefill listed first: the runner reorders rows internally, logits come back in order.
    mixed = runner.forward([SeqChunk(3, b, 0), SeqChunk(0, [first], len(a))])
    # q4_1: alone, the decode token goes through the one-call step (C attention on the fp16
    # cache, the token's own k and v rounded to fp16 as the cache keeps them, int16 kernels);
    # mixed, through the per-op path (torch's attention on the cache read back as fp32, the
    # GEMMs): other rounding, the same values and the same top token.
    tolerance = {"fp32": 1e-4, "q4_1": 0.02}[fmt]  # q4_1: 3.4e-3 measured
    torch.testing.assert_close(mixed[0], prefill_alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], decode_alone[0], atol=tolerance, rtol=0)
    assert int(mixed[1].argmax()) == int(decode_alone[0].argmax())


def test_copy_slot_prefix_then_continue_equals_recompute(fp32: ModelRunner) -> None:
    prompt = CASES[2]["prompt_ids"]
    full = fp32.forward([SeqChunk(0, prompt, 0)])
    shared = len(prompt) - 5
    fp32.forward([SeqChunk(4, [0] * 40, 0)])  # leave stale KV in the destination slot
    fp32.copy_slot_prefix(0, 4, shared)
    resumed = fp32.forward([SeqChunk(4, prompt[shared:], shared)])
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "chunks",
    [
        [SeqChunk(6, [1], 0)],
        [SeqChunk(-1, [1], 0)],
        [SeqChunk(0, [], 0)],
        [SeqChunk(0, [1, 2], 255)],
        [SeqChunk(0, [1], 0), SeqChunk(0, [2], 1)],
        [],
        [SeqChunk(0, [49152], 0)],
        [SeqChunk(0, [5, -1], 0)],
    ],
    ids=[
        "slot-too-big",
        "negative-slot",
        "empty",
        "past-max-len",
        "same-slot-twice",
        "no-chunks",
        "token-past-vocab",
        "negative-token",
    ],
)
def test_forward_rejects_bad_chunks(fp32: ModelRunner, chunks: list[SeqChunk]) -> None:
    with pytest.raises(ValueError):
        fp32.forward(chunks)


@pytest.mark.parametrize("token", [-1, 49152, 10**9])
def test_one_call_decode_refuses_tokens_outside_the_vocabulary(
    q4_1: ModelRunner, token: int
) -> None:
    # The one-call decode step reads the embedding row in C: an id past it must be refused
    # before, not read from whatever memory follows.
    assert q4_1.vocab_size == 49152
    with pytest.raises(ValueError, match="outside"):
        q4_1.forward([SeqChunk(0, [token], 0)])


def test_copy_slot_prefix_rejects_bad_arguments(fp32: ModelRunner) -> None:
    with pytest.raises(ValueError):
        fp32.copy_slot_prefix(0, 6, 1)
    with pytest.raises(ValueError):
        fp32.copy_slot_prefix(0, 1, 257)
