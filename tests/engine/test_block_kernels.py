"""The Q4_1 / Q8_0 block kernels against plain torch arithmetic on the same blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenspout.engine import block_kernels
from tokenspout.engine.model_files import ModelFiles

pytestmark = pytest.mark.skipif(
    not block_kernels.available(), reason="the block kernels need AVX2 and a C compiler"
)


@pytest.fixture(autouse=True, params=block_kernels.supported_isas() or ["avx2"])
def kernels_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on each build this CPU runs (the AVX-512 VNNI one has its own GEMM)."""
    monkeypatch.setenv(block_kernels.ISA_VARIABLE, request.param)
    return request.param


def gemm_bound(build: str) -> float:
    """The GEMM's error bound, relative to |x| @ |w|: the VNNI build's GEMM rounds x to int16
    per block of 32 as the kernel does (~1e-5 of the block's largest value); the fp32 one
    ~1e-7."""
    return 1e-4 if build in ("avx512-vnni", "avx512-amx") else 1e-5


def activations(rows: int, k: int, seed: int) -> torch.Tensor:
    """Hidden-state-like rows: mostly small values and a few large outlier columns."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x[:, torch.randint(0, k, (3,), generator=gen)] *= 40
    x[0, :32] = 0.0  # an all-zero block: its scale is 0
    return x


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17, 33])
# k = 96: an odd number of blocks (the AVX-512 kernels take blocks in pairs, then the last)
@pytest.mark.parametrize(("n", "k"), [(37, 64), (960, 576), (64, 1536), (37, 96)])
def test_q4_1_matches_its_dequantised_weights(
    rows: int, n: int, k: int, kernels_build: str
) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    blocks = block_kernels.quantize_q4_1(w)
    linear = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
    x = activations(rows, k, seed=rows)
    expected = x.double() @ linear.dequantize().double().T
    scale = (x.abs().double() @ linear.dequantize().abs().double().T).max()
    # The kernel rounds x to int16 per block of 32: relative error ~1e-5 of the block's
    # largest value.
    for path, bound in (
        (linear, 1e-4),
        (linear.kernel, 1e-4),
        (linear.gemm, gemm_bound(kernels_build)),
    ):
        got = path(x)
        assert got.shape == (rows, n)
        assert ((got.double() - expected).abs().max() / scale).item() < bound


@pytest.mark.parametrize("rows", [1, 2, 3, 9, 33])
@pytest.mark.parametrize("inner", [6, 1536, 37])  # whole panels of 6; SmolLM2's; a tail
def test_q4_1_swiglu_matches_silu_of_gate_times_up(
    rows: int, inner: int, kernels_build: str
) -> None:
    k = 64 if inner == 37 else 576
    w = torch.randn(2 * inner, k, generator=torch.Generator().manual_seed(inner))
    blocks = block_kernels.quantize_q4_1(w)
    linear = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
    x = activations(rows, k, seed=rows)
    weights = linear.dequantize().double()
    gate, up = (x.double() @ weights.T).chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    # an error of e * |x| @ |w| in gate and up each moves the product by ~ e * that squared
    sizes = (x.abs().double() @ weights.abs().T).chunk(2, dim=-1)
    scale = sizes[0].max() * sizes[1].max()
    got = linear.swiglu(x)
    assert got.shape == (rows, inner) and got.dtype == torch.float32
    # as test_q4_1_matches_its_dequantised_weights; SiLU's exp is within 2 ulp
    bound = 1e-4 if rows <= linear.KERNEL_ROWS else gemm_bound(kernels_build)
    assert ((got.double() - expected).abs().max() / scale).item() < bound


@pytest.mark.parametrize(("n", "k"), [(37, 64), (960, 576), (3, 96)])
def test_q4_1_bf16_weights_are_q_times_d_plus_m_rounded_to_nearest_even(n: int, k: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    w[0, :32] = 0.0  # a block whose scale is 0
    blocks = block_kernels.quantize_q4_1(w)
    linear = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
    nibbles = blocks["qs"].view(n, k // 32, 16)
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).double()
    # one fp32 rounding of q * d + m (an FMA), then torch's rounding to bf16
    exact = q * blocks["d"].double()[..., None] + blocks["m"].double()[..., None]
    expected = exact.view(n, k).float().bfloat16()
    got = linear.bf16_weights()
    assert got.dtype == torch.bfloat16 and got.shape == (n, k)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("threshold", [1, 10])
def test_q4_1_runs_in_bf16_from_bf16_rows(threshold: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # From BF16_ROWS rows (set where the CPU has AMX) x and the weights are rounded to bf16
    # and torch multiplies them; below, the block kernels' arithmetic is unchanged. bf16
    # keeps 8 bits: x and w each move by <= 2^-9 relative and the result by 2^-9 of itself.
    w = torch.randn(200, 576, generator=torch.Generator().manual_seed(5))
    blocks = block_kernels.quantize_q4_1(w)
    linear = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
    x = activations(12, 576, seed=6)
    blocks_result = linear(x[: threshold - 1]) if threshold > 1 else None
    monkeypatch.setattr(block_kernels.Q4Linear, "BF16_ROWS", threshold)
    weights = linear.dequantize().double()
    for rows in [r for r in (threshold - 1, threshold, threshold + 2) if r > 0]:
        got = linear(x[:rows])
        bf16 = torch.nn.functional.linear(x[:rows].bfloat16(), linear.bf16_weights()).float()
        if rows >= threshold:
            assert torch.equal(got, bf16)
            scale = (x[:rows].abs().double() @ weights.abs().T).max()
            error = (got.double() - x[:rows].double() @ weights.T).abs().max() / scale
            assert error.item() < 3 * 2**-9
        else:
            assert blocks_result is not None and torch.equal(got, blocks_result)


@pytest.mark.parametrize("inner", [1536, 37])  # SmolLM2's; a tail the C loop does alone
def test_q4_1_swiglu_in_bf16_is_silu_of_the_bf16_product(
    inner: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = torch.randn(2 * inner, 576, generator=torch.Generator().manual_seed(inner))
    blocks = block_kernels.quantize_q4_1(w)
    linear = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
    x = activations(20, 576, seed=7)
    monkeypatch.setattr(block_kernels.Q4Linear, "BF16_ROWS", 1)
    product = torch.nn.functional.linear(x.bfloat16(), linear.bf16_weights()).double()
    gate, up = product.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = linear.swiglu(x)
    assert got.shape == (20, inner) and got.dtype == torch.float32
    # SiLU's exp is within 2 ulp; the product's factors are exact bf16 values
    bound = 1e-6 * gate.abs().max() * up.abs().max()
    assert (got.double() - expected).abs().max() < bound


@pytest.mark.parametrize("rows", [1, 4, 6, 21])
@pytest.mark.parametrize("k", [576, 96])
def test_q8_0_matches_its_dequantised_weights(rows: int, k: int) -> None:
    w = torch.randn(300, k, generator=torch.Generator().manual_seed(1))
    w[0, :32] = 0.0
    blocks = block_kernels.quantize_q8_0(w)
    linear = block_kernels.Q8Linear(blocks["qs"], blocks["d"])
    weights = block_kernels.dequantize_q8_0(blocks["qs"], blocks["d"])
    x = activations(rows, k, seed=rows)
    expected = x.double() @ weights.double().T
    scale = (x.abs().double() @ weights.abs().double().T).max()
    assert ((linear(x).double() - expected).abs().max() / scale).item() < 1e-4
    ids = torch.tensor([5, 0, 299])
    assert torch.equal(linear.rows(ids), weights[ids])


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded per row and block of 32 as the int8 GEMMs round it (x * (127 /
    max|x|) in fp32, to nearest even), back to values: float64 [M, K]."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    assert q.abs().max() <= 127
    return (q.double() * (amax / 127).double()).reshape(x.shape)


@pytest.mark.parametrize("rows", [1, 9, 16, 17, 33])
@pytest.mark.parametrize(("n", "k"), [(37, 64), (960, 576), (64, 1536)])
def test_int8_gemms_match_their_arithmetic(rows: int, n: int, k: int, kernels_build: str) -> None:
    # Decode steps' GEMMs on the int8 builds: the dequantised weights (q * d + m) times x
    # rounded to int8, by exact integer sums scaled per block. Against that arithmetic in
    # float64 the error is fp32 rounding; against unrounded x, ~4e-3.
    gen = torch.Generator().manual_seed(rows + n)
    x = activations(rows, k, seed=rows)
    q4 = block_kernels.quantize_q4_1(torch.randn(n, k, generator=gen))
    linear = block_kernels.Q4Linear(q4["qs"], q4["d"], q4["m"])
    q8 = block_kernels.quantize_q8_0(torch.randn(n, k, generator=gen))
    head = block_kernels.Q8Linear(q8["qs"], q8["d"])
    if kernels_build not in block_kernels.INT8_BUILDS:
        with pytest.raises(ValueError, match="int8"):
            linear.gemm(x, int8=True)
        return
    rounded = int8_rounded(x)
    weights = linear.dequantize().double()
    expected = rounded @ weights.T
    scale = (x.abs().double() @ weights.abs().T).max()
    got = linear.gemm(x, int8=True)
    assert ((got.double() - expected).abs().max() / scale).item() < 1e-6
    assert ((got.double() - x.double() @ weights.T).abs().max() / scale).item() > 1e-4
    gate, up = expected.chunk(2, dim=-1) if n % 2 == 0 else (None, None)
    if gate is not None:
        got = linear.swiglu(x, int8=True)
        sizes = (x.abs().double() @ weights.abs().T).chunk(2, dim=-1)
        bound = 1e-6 * sizes[0].max() * sizes[1].max()
        assert (got.double() - torch.nn.functional.silu(gate) * up).abs().max() < bound
    weights = block_kernels.dequantize_q8_0(q8["qs"], q8["d"]).double()
    scale = (x.abs().double() @ weights.abs().T).max()
    got = head.gemm(x, int8=True)
    assert ((got.double() - rounded @ weights.T).abs().max() / scale).item() < 1e-6


@pytest.mark.parametrize("rows", [1, 9, 16, 33])
# k = 96: an odd number of blocks (the tiles take blocks in pairs, then the last); n = 37: a
# last panel with rows of zeros
@pytest.mark.parametrize(("n", "k"), [(37, 96), (960, 576), (64, 1536)])
def test_amx_tiles_give_the_vnni_builds_int8_gemms_bit_for_bit(
    rows: int, n: int, k: int, kernels_build: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The avx512-amx build multiplies decode steps' int8 GEMMs in AMX tiles and scales the
    # blocks' exact integer sums as the avx512-vnni build does: the same bits, Q4_1 (unsigned
    # q), Q8_0 (signed q, the LM head) and the SwiGLU.
    if kernels_build != "avx512-amx":
        pytest.skip("the AMX build against the VNNI one: once, where this CPU has AMX")
    gen = torch.Generator().manual_seed(rows + n + k)
    x = activations(rows, k, seed=rows)
    q4 = block_kernels.quantize_q4_1(torch.randn(n, k, generator=gen))
    q8 = block_kernels.quantize_q8_0(torch.randn(n, k, generator=gen))
    results = []
    for build in ("avx512-vnni", "avx512-amx"):
        monkeypatch.setenv(block_kernels.ISA_VARIABLE, build)
        assert block_kernels.loaded_isa() == build
        linear = block_kernels.Q4Linear(q4["qs"], q4["d"], q4["m"])
        head = block_kernels.Q8Linear(q8["qs"], q8["d"])
        results.append(
            [linear.gemm(x, int8=True), head.gemm(x, int8=True)]
            + ([linear.swiglu(x, int8=True)] if n % 2 == 0 else [])
        )
    for vnni, amx in zip(*results, strict=True):
        assert torch.equal(vnni, amx)


def test_rows_of_a_batch_do_not_depend_on_each_other() -> None:
    # Each row is quantised and summed on its own by the kernel, and has a lane of its own in
    # the GEMM's tiles: a sequence's logits must not change with what else is in the step
    # (batched decode == each alone, a prefill == its chunks).
    w = torch.randn(200, 576, generator=torch.Generator().manual_seed(2))
    blocks = block_kernels.quantize_q4_1(w)
    linear = block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])
    x = activations(27, 576, seed=3)  # the GEMM's chunks: 16 rows, then 8 + 3 of padding
    few = linear.KERNEL_ROWS
    alone = torch.cat([linear(x[i : i + 1]) for i in range(few)])
    assert torch.equal(linear(x[:few]), alone)
    together = linear(x)
    assert torch.equal(torch.cat([linear(x[: few + 1]), linear(x[few + 1 :])]), together)
    order = torch.randperm(27, generator=torch.Generator().manual_seed(4))
    assert torch.equal(linear(x[order]), together[order])


def test_quantisers_round_trip_within_one_step() -> None:
    # Half a step, and what storing d and m as fp16 moves (relative 2^-11, as llama.cpp: q is
    # computed with the fp32 values) times the most steps from m (15, or 127 for Q8_0).
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    q4 = block_kernels.quantize_q4_1(w)
    assert q4["d"].dtype == q4["m"].dtype == torch.float16
    d, m = (q4[p].float().repeat_interleave(32, dim=1) for p in "dm")
    bound = d / 2 + (15 * d + m.abs()) * 2**-11 + 1e-6
    assert ((block_kernels.dequantize_q4_1(q4["qs"], q4["d"], q4["m"]) - w).abs() <= bound).all()
    q8 = block_kernels.quantize_q8_0(w)
    d = q8["d"].float().repeat_interleave(32, dim=1)
    bound = d / 2 + 127 * d * 2**-11 + 1e-6
    assert ((block_kernels.dequantize_q8_0(q8["qs"], q8["d"]) - w).abs() <= bound).all()


def test_bad_activations_are_refused_not_read_as_garbage() -> None:
    blocks = block_kernels.quantize_q8_0(torch.randn(4, 64))
    linear = block_kernels.Q8Linear(blocks["qs"], blocks["d"])
    with pytest.raises(ValueError, match="fp32"):
        linear(torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="64"):
        linear(torch.randn(2, 32))


def test_scales_other_than_fp16_are_refused_not_read_as_garbage() -> None:
    q8 = block_kernels.quantize_q8_0(torch.randn(4, 64))
    with pytest.raises(ValueError, match="fp16"):
        block_kernels.Q8Linear(q8["qs"], q8["d"].float())
    q4 = block_kernels.quantize_q4_1(torch.randn(4, 64))
    with pytest.raises(ValueError, match="fp16"):
        block_kernels.Q4Linear(q4["qs"], q4["d"], q4["m"].float())


def test_gguf_blocks_dequantise_as_gguf_does() -> None:
    # The default model's own Q4_1 and Q8_0 tensors, split into the kernels' layout, give
    # back exactly what gguf-py's dequantize gives.
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(ModelFiles.resolve(None).path)
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"):
        tensor = tensors[name]
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        rows, cols = expected.shape
        raw = np.asarray(tensor.data).reshape(-1)
        if tensor.tensor_type.name == "Q4_1":
            parts = block_kernels.split_gguf_q4_1(raw, rows, cols)
            got = block_kernels.dequantize_q4_1(
                *(torch.from_numpy(parts[p]) for p in "qs d m".split())
            )
        else:
            parts = block_kernels.split_gguf_q8_0(raw, rows, cols)
            got = block_kernels.dequantize_q8_0(
                torch.from_numpy(parts["qs"]), torch.from_numpy(parts["d"])
            )
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(rows: int, with_delta: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, delta = torch.randn(rows, 100, generator=gen), torch.randn(rows, 100, generator=gen)
    weight = torch.randn(100, generator=gen)
    summed = x + delta if with_delta else x.clone()
    expected = torch.nn.functional.rms_norm(summed, (100,), weight, 1e-5)
    got = block_kernels.add_rms_norm(x, delta if with_delta else None, weight, 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, summed)  # the residual add happened in place


@pytest.mark.parametrize("tokens", [1, 5, 70])  # 70: a prompt chunk, split over the threads
def test_rope_and_store_matches_the_torch_path(tokens: int) -> None:
    from tokenspout.engine.kv_cache import KVCache
    from tokenspout.engine.llama_model import Rotary

    heads, kv_heads, d = 9, 3, 64
    rope = Rotary(d, 10000.0, 64, torch.float32)
    if tokens > 5:  # two prompt chunks of 35 tokens, in slots 0 and 1
        positions, slots = torch.arange(tokens) % 35, torch.arange(tokens) // 35
    else:
        positions = torch.tensor([3, 17, 0, 63, 8][:tokens])
        slots = torch.tensor([1, 0, 2, 2, 1][:tokens])
    cos, sin = rope.tables(positions)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d)
    expected_cache, cache = (KVCache(1, 3, 64, kv_heads, d, torch.float16) for _ in range(2))
    rows = cache.rows(slots, positions)
    qk = rope(qkv[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d), cos, sin)
    got = qkv.clone()
    k_slots, v_slots = cache.slot_view(0)
    block_kernels.rope_and_store(
        got, heads, kv_heads, cos.squeeze(1), sin.squeeze(1), rows, k_slots, v_slots
    )
    got_qk = got[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d)
    torch.testing.assert_close(got_qk, qk)  # q and k roped in place
    # The cache holds the roped k and the v rounded to fp16 as torch rounds (to nearest even):
    # the same bits as KVCache.write of them.
    v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d)
    expected_cache.write(0, rows, got_qk[:, heads:], v)
    assert torch.equal(k_slots, expected_cache.slot_view(0)[0])
    assert torch.equal(v_slots, expected_cache.slot_view(0)[1])


def reference_decode(ids, embed, layers, final_norm, head, positions, slots, caches, heads, eps):
    """decode_layers' arithmetic in plain torch, on the dequantised weights (fp32) and caches
    that hold fp16 values in fp32, as the token's own k and v are rounded to fp16 too."""
    from tokenspout.engine.llama_model import Rotary

    k_cache, v_cache = caches
    kv_heads, d = k_cache.shape[2], k_cache.shape[4]
    rope = Rotary(d, 10000.0, k_cache.shape[3], torch.float32)
    cos, sin = rope.tables(positions)  # [M, 1, D]
    norm = torch.nn.functional.rms_norm
    x = embed.rows(ids)
    for n, (attn_norm, wqkv, wo, ffn_norm, w13, w2) in enumerate(layers):
        qkv = norm(x, (x.shape[1],), attn_norm, eps) @ wqkv.dequantize().T
        qk = rope(qkv[:, : (heads + kv_heads) * d].view(-1, heads + kv_heads, d), cos, sin)
        v = qkv[:, (heads + kv_heads) * d :].view(-1, kv_heads, d)
        outs = []
        for r, (slot, pos) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
            k_cache[n, slot, :, pos] = qk[r, heads:].half()
            v_cache[n, slot, :, pos] = v[r].half()
            keys, values = k_cache[n, slot, :, : pos + 1], v_cache[n, slot, :, : pos + 1]
            o = torch.nn.functional.scaled_dot_product_attention(
                qk[r, :heads, None], keys, values, enable_gqa=True
            )  # [Hq, 1, D]
            outs.append(o.reshape(1, heads * d))
        x = x + torch.cat(outs) @ wo.dequantize().T
        gate, up = (norm(x, (x.shape[1],), ffn_norm, eps) @ w13.dequantize().T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w2.dequantize().T
    h = norm(x, (x.shape[1],), final_norm, eps)
    return h @ block_kernels.dequantize_q8_0(head.qs, head.d).T


def small_model(gen: torch.Generator, hidden: int, heads: int, kv_heads: int, inter: int):
    """Random Q4_1 layers (2), norms, and a Q8_0 embedding and head of 50 tokens."""
    d = 64

    def q4(n: int, k: int) -> block_kernels.Q4Linear:
        blocks = block_kernels.quantize_q4_1(torch.randn(n, k, generator=gen) / k**0.5)
        return block_kernels.Q4Linear(blocks["qs"], blocks["d"], blocks["m"])

    def q8(n: int, k: int) -> block_kernels.Q8Linear:
        blocks = block_kernels.quantize_q8_0(torch.randn(n, k, generator=gen))
        return block_kernels.Q8Linear(blocks["qs"], blocks["d"])

    def norm_weight() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(hidden, generator=gen)

    layers = [
        (
            norm_weight(),
            q4((heads + 2 * kv_heads) * d, hidden),
            q4(hidden, heads * d),
            norm_weight(),
            q4(2 * inter, hidden),
            q4(hidden, inter),
        )
        for _ in range(2)
    ]
    return layers, norm_weight(), q8(50, hidden), q8(50, hidden)


@pytest.mark.parametrize(
    ("positions", "slots"),
    [
        ([0], [1]),
        ([37], [0]),
        ([5, 30], [2, 0]),
        ([5, 30, 0, 12, 39, 7], [2, 0, 5, 1, 3, 4]),
        ([7 * i % 40 for i in range(19)], [(5 * i + 3) % 19 for i in range(19)]),
    ],
    # six: a group of 4 rows of x, then one of 2; nineteen: GEMMs, a chunk of 16 and one of 8
    ids=["first", "one", "two", "six", "nineteen"],
)
@pytest.mark.parametrize(
    ("heads", "kv_heads"),
    [(4, 2), (6, 2), (7, 1)],
    # query heads per KV head: 2, as SmolLM2's 3 (9 on 3), and 7 on one
    ids=["groups-of-2", "groups-of-3", "a-group-of-7"],
)
def test_decode_layers_match_the_torch_layers(
    positions: list[int], slots: list[int], heads: int, kv_heads: int
) -> None:
    # Small random layers of the model's shape family (hidden 128, query heads of 64 sharing
    # KV heads, intermediate 256), caches with random earlier keys and values.
    from tokenspout.engine.llama_model import Rotary

    gen = torch.Generator().manual_seed(len(positions) + positions[0])
    eps = 1e-5
    layers, final, embed, head = small_model(gen, 128, heads, kv_heads, 256)
    caches = [torch.randn(2, 19, kv_heads, 40, 64, generator=gen).half() for _ in range(2)]
    expected_caches = [c.float() for c in caches]
    ids = torch.tensor([7, 49, 0, 13, 21, 33] * 4)[: len(positions)]
    pos, slot = torch.tensor(positions), torch.tensor(slots)
    expected = reference_decode(
        ids, embed, layers, final, head, pos, slot, expected_caches, heads, eps
    )  # fmt: skip
    # int16 GEMMs: int8 ones (test_int8_gemms_match_their_arithmetic) round x 256x coarser,
    # and a rounding that flips at a step of x's grid moves everything after it.
    decoder = block_kernels.DecodeLayers(
        layers, final, embed, head, heads=heads, kv_heads=kv_heads, head_dim=64, eps=eps,
        int8=False,
    )  # fmt: skip
    rope = Rotary(64, 10000.0, 40, torch.float32)
    got = decoder(ids.tolist(), slot.tolist(), pos.tolist(), rope.cos, rope.sin_signed, *caches)
    # The kernels round the matmuls' inputs to int16 per block of 32 (~1e-5 of the block's
    # largest); the GEMMs are fp32 throughout.
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=2e-3)
    for cache, expected_cache in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(cache.float(), expected_cache, atol=2e-3, rtol=2e-3)


def small_decoder(
    seed: int, heads: int, kv_heads: int
) -> tuple[block_kernels.DecodeLayers, torch.Generator]:
    """``DecodeLayers`` over ``small_model``'s random layers, and the generator after them."""
    gen = torch.Generator().manual_seed(seed)
    layers, final, embed, head = small_model(gen, 128, heads, kv_heads, 256)
    decoder = block_kernels.DecodeLayers(
        layers, final, embed, head, heads=heads, kv_heads=kv_heads, head_dim=64, eps=1e-5
    )
    return decoder, gen


def test_decode_layers_rows_do_not_depend_on_each_other(kernels_build: str) -> None:
    decoder, gen = small_decoder(9, 2, 2)
    gemm = decoder.gemm_rows
    assert gemm == block_kernels.DecodeLayers.GEMM_ROWS[kernels_build]
    total = 2 * gemm + 1  # two GEMM steps' worth, and a chunk of 16 plus a part of one
    caches = [torch.randn(2, total, 2, 16, 64, generator=gen).half() for _ in range(2)]
    ids = torch.randint(0, 50, (total,), generator=gen)
    pos = torch.randint(0, 16, (total,), generator=gen)
    slot = torch.randperm(total, generator=gen)
    cos, sin = torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen)

    def run(rows: torch.Tensor | slice) -> torch.Tensor:
        picked = (t[rows].tolist() for t in (ids, slot, pos))
        return decoder(*picked, cos, sin, *(c.clone() for c in caches))

    few = gemm - 1  # by the kernels
    assert torch.equal(run(slice(0, few)), torch.cat([run(slice(i, i + 1)) for i in range(few)]))
    together = run(slice(None))  # by the GEMMs
    assert torch.equal(torch.cat([run(slice(0, gemm)), run(slice(gemm, None))]), together)
    order = torch.randperm(total, generator=gen)
    assert torch.equal(run(order), together[order])
    many = [0] * (decoder.ROWS + 1)
    with pytest.raises(ValueError, match="tokens"):
        decoder(many, many, many, cos, sin, *caches)


@pytest.mark.parametrize("tokens", [2, 10], ids=["kernels", "gemms"])
def test_decode_layers_do_not_depend_on_the_thread_count(tokens: int) -> None:
    # Every output row, head and norm is computed whole by one thread with the same
    # arithmetic, whichever thread: 1 and 2 threads give the same bits.
    decoder, gen = small_decoder(10, 4, 2)
    caches = [torch.randn(2, tokens, 2, 40, 64, generator=gen).half() for _ in range(2)]
    ids = torch.randint(0, 50, (tokens,), generator=gen)
    pos = torch.randint(0, 40, (tokens,), generator=gen)
    slot = torch.randperm(tokens, generator=gen)
    cos, sin = torch.randn(40, 64, generator=gen), torch.randn(40, 64, generator=gen)
    before = torch.get_num_threads()
    try:
        logits = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            picked = (t.tolist() for t in (ids, slot, pos))
            logits.append(decoder(*picked, cos, sin, *(c.clone() for c in caches)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("vocab", [49152, 1000, 7])  # whole blocks of 64; a tail; tail only
def test_sample_rows_matches_the_torch_inverse_cdf(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(40, vocab, generator=gen) * 4
    logits[3, : vocab // 2] = float("-inf")  # masked tokens have no mass
    logits[5, 1:] = float("-inf")  # one token left
    rows = [r for r in range(40) if r != 7]
    temps = [0.3 + 0.05 * r for r in rows]
    u = torch.rand(len(rows), generator=gen)
    got = block_kernels.sample_rows(logits, rows, temps, u.tolist())
    scaled = logits[rows] / torch.tensor(temps).unsqueeze(1)
    cdf = torch.softmax(scaled.double(), dim=-1).cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(1), right=True)
    # Different summation orders could part only within ~1e-6 of a token's boundary.
    assert got == expected.squeeze(1).tolist()
    assert got[rows.index(5)] == 0
    assert logits[3, got[rows.index(3)]] != float("-inf")


def test_a_build_that_does_not_compile_falls_back_to_avx2(
    monkeypatch: pytest.MonkeyPatch, kernels_build: str
) -> None:
    # e.g. a compiler too old for -mavx512vnni: the engine keeps its 4-bit kernels.
    if kernels_build == "avx2":
        pytest.skip("only the AVX-512 build falls back")
    real = block_kernels.flags
    monkeypatch.setattr(
        block_kernels,
        "flags",
        lambda target: real(target) + ["-mno-such-flag"] * (target != "avx2"),
    )
    block_kernels._load.cache_clear()
    try:
        assert block_kernels._library() is not None
        assert block_kernels._library() is block_kernels._load("avx2")
        assert block_kernels._load(kernels_build) is None
        # ... with the AVX2 build's threshold for its GEMMs, not the failed build's.
        assert block_kernels.loaded_isa() == "avx2"
        assert small_decoder(1, 2, 2)[0].gemm_rows == block_kernels.DecodeLayers.GEMM_ROWS["avx2"]
    finally:
        block_kernels._load.cache_clear()


def test_an_amx_build_that_does_not_compile_falls_back_to_avx512_vnni(
    monkeypatch: pytest.MonkeyPatch, kernels_build: str
) -> None:
    # e.g. a compiler too old for -mamx-int8 on a CPU with AMX: the next best build, not AVX2.
    if kernels_build != "avx512-amx":
        pytest.skip("where this CPU has AMX")
    real = block_kernels.flags
    monkeypatch.setattr(
        block_kernels,
        "flags",
        lambda target: real(target) + ["-mno-such-flag"] * (target == "avx512-amx"),
    )
    block_kernels._load.cache_clear()
    try:
        assert block_kernels.loaded_isa() == "avx512-vnni"
        assert block_kernels._library() is block_kernels._load("avx512-vnni")
    finally:
        block_kernels._load.cache_clear()
