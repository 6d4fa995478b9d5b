"""The llama transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Inference only, on a *packed* batch: the tokens of every sequence in a step are concatenated
into one [N, H] tensor, so each matmul runs once per step whatever the mix of prefill and
decode. Only attention looks at sequences separately (``AttentionBatch``).

The parts are plain classes rather than ``nn.Module``: there is nothing to train, and at
batch 1 the ~3 µs of ``Module.__call__`` per call, ×8 per layer ×30 layers, is measurable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenspout.engine import block_kernels
from tokenspout.engine.kv_cache import KVCache
from tokenspout.engine.weights import LAYER_MATMULS, Weights
from tokenspout.errors import ModelLoadError

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants, with Hugging Face ``config.json`` names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        """From ``config.json`` or ``ModelFiles.metadata()["config"]``."""
        if config.get("rope_scaling") not in (None, "none"):
            raise ModelLoadError(f"RoPE scaling {config['rope_scaling']!r} is not supported")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
        )

    def check_context(self, max_model_len: int) -> None:
        """Refuse (``ModelLoadError``) a context longer than the model's."""
        if max_model_len > self.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len {max_model_len} exceeds the model's context length "
                f"{self.max_position_embeddings}"
            )


@dataclass
class AttentionBatch:
    """How the packed tokens of one step map onto sequences and KV-cache slots.

    Rows ``[0, num_decode)`` are decode tokens (one per sequence); each prefill chunk
    follows as a run of rows. Masks are built once per step and shared by all layers.
    """

    write_rows: torch.Tensor  # [N * Hkv] KV-cache rows of the tokens (KVCache.rows)
    num_decode: int
    decode_slots: torch.Tensor | slice  # [B] slots, or a slice when they are consecutive
    decode_len: int  # S: keys to read, max(pos) + 1 over the decode tokens
    decode_mask: torch.Tensor | None  # [B, 1, 1, S] True where a key is visible
    prefills: list[tuple[int, int, int, int]]  # (first row, T, slot, start_pos)
    #: Per chunk: None from position 0 (plain causal attention), else [T, start_pos + T],
    #: 0 where query i sees key j (j <= start_pos + i) and -inf elsewhere, in the activations'
    #: dtype (a bool mask is converted to that by every layer's attention).
    prefill_masks: list[torch.Tensor | None]


class Int8Linear:
    """x @ (q * scale).T with int8 weights q [N, K] and bf16 activations.

    ``_weight_int8pack_mm`` streams the weights once per row of x: the fastest choice for
    decode (M <= 16: half the bytes of bf16), but linear in M. For a prefill chunk a bf16
    GEMM on weights converted on the fly wins (M = 128: 0.8 ms against 2.3 ms for a
    [3072, 576] weight on 2 cores), so rows above ``GEMM_ROWS`` take that path.
    """

    GEMM_ROWS = 32

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.GEMM_ROWS:
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return F.linear(x, self.q.to(x.dtype)) * self.scale


class Fp16Linear:
    """x @ w.T with fp16 weights and fp32 activations, by fbgemm's packed fp16 GEMM.

    The weights are packed once for the kernel (fbgemm keeps its own copy); the activations
    stay fp32, so unlike int8 GEMMs nothing is quantised on the way in. On an AVX2-only CPU
    it is 2.5-3x faster than the alternatives at batch 4-16 (benchmarks/block_kernels.py).
    """

    # The overload itself: calling the packet re-resolves it and checks every argument for
    # Python dispatch, on each of the 121 calls of a step.
    _matmul = torch.ops.quantized.linear_dynamic_fp16.default

    def __init__(self, weight: torch.Tensor):
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.packed)


class RMSNorm:
    """x / rms(x) * weight, over the last dimension.

    ``fused``: by the block kernels' C function (fp32 only), which also does the residual
    add before it in ``add_and_norm``: 61 of these per decode step cost ~30 µs each as
    ``F.rms_norm``'s six small ops at batch 1, ~2 µs in C.
    """

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False):
        self.weight = weight
        self.eps = eps
        self.fused = fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return block_kernels.add_rms_norm(x.contiguous(), None, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm); ``x`` (a tensor of the step's own) may be updated in place."""
        if self.fused:
            return x, block_kernels.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


class Rotary:
    """RoPE in Hugging Face's rotate_half layout, with cos/sin tables for every position."""

    def __init__(self, head_dim: int, theta: float, max_len: int, dtype: torch.dtype):
        # Same arithmetic as transformers' LlamaRotaryEmbedding, so fp32 matches it bit for bit.
        inv_freq = 1.0 / theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        )
        freqs = torch.arange(max_len).float()[:, None] * inv_freq[None, :]  # [L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
        self.cos = emb.cos().to(dtype)
        # rotate_half(x) * sin == roll(x, D/2) * sin_signed: one op instead of chunk+neg+cat.
        half = head_dim // 2
        self.sin_signed = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), -1).to(dtype)
        self.half = half

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed for ``positions`` [N], shaped [N, 1, D] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [N, heads, D]
        return x * cos + x.roll(self.half, -1) * sin


class Attention:
    """Grouped-query self-attention over the KV cache (q, k, v from one fused matmul)."""

    def __init__(
        self, config: LlamaConfig, layer: int, wqkv: Linear, wo: Linear, fused: bool = False
    ):
        self.layer = layer
        #: RoPE and the KV-cache write in one C call (block kernels, fp32): they were ~15
        #: small ops of a few µs each per layer.
        self.fused = fused
        self.wqkv, self.wo = wqkv, wo
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.heads * self.head_dim
        self.qk_heads = self.heads + self.kv_heads

    def __call__(
        self,
        x: torch.Tensor,
        rope: Rotary,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
    ) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        qkv = self.wqkv(x)  # [N, (Hq + 2*Hkv) * D]
        k_slots, v_slots = cache.slot_view(self.layer)  # [slots, Hkv, L, D]
        if self.fused:
            block_kernels.rope_and_store(
                qkv, self.heads, self.kv_heads, cos.squeeze(1), sin.squeeze(1),
                batch.write_rows, k_slots, v_slots,
            )  # fmt: skip
            q = qkv[:, : self.q_size].view(n, self.heads, d)
        else:
            # q and k sit side by side in each row, so RoPE rotates both in one pass.
            qk = rope(qkv[:, : self.qk_heads * d].view(n, self.qk_heads, d), cos, sin)
            q = qk[:, : self.heads]  # [N, Hq, D]
            k = qk[:, self.heads :]  # [N, Hkv, D]
            v = qkv[:, self.qk_heads * d :].view(n, self.kv_heads, d)  # [N, Hkv, D]
            cache.write(self.layer, batch.write_rows, k, v)
        outs = []
        if batch.num_decode:
            outs.append(self._decode(q[: batch.num_decode], k_slots, v_slots, batch))
        for (row, t, slot, start), mask in zip(batch.prefills, batch.prefill_masks, strict=True):
            outs.append(self._prefill(q[row : row + t], k_slots[slot], v_slots[slot], start, mask))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [N, Hq * D]
        return self.wo(out)

    def _decode(
        self, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        b, s, d = q.shape[0], batch.decode_len, self.head_dim
        # [B, Hkv, S, D]; a view when the slots are consecutive.
        k = _select(k_slots, batch.decode_slots, s).to(q.dtype)
        v = _select(v_slots, batch.decode_slots, s).to(q.dtype)
        # One query per sequence: fold the G query heads that share a KV head into the query
        # axis, q: [B, Hkv, G, D], so no K/V repeat is needed for GQA.
        qg = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, d)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=batch.decode_mask)
        return o.reshape(b, self.q_size)  # [B, Hkv, G, D] -> [B, Hq * D]

    def _prefill(
        self,
        q: torch.Tensor,
        k_slot: torch.Tensor,
        v_slot: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        t, s = q.shape[0], start + q.shape[0]
        # In bf16 where a chunk of this size has its matmuls in bf16 (Q4Linear.BF16_ROWS,
        # AMX): torch's flash attention then multiplies in AMX tiles too, softmax in fp32.
        bf16_rows = block_kernels.Q4Linear.BF16_ROWS if self.fused else None
        dtype = torch.bfloat16 if bf16_rows is not None and t >= bf16_rows else q.dtype
        qh = q.transpose(0, 1).unsqueeze(0).to(dtype)  # [1, Hq, T, D]
        k = k_slot[:, :s].unsqueeze(0).to(dtype)  # [1, Hkv, S, D], from an fp16 cache
        v = v_slot[:, :s].unsqueeze(0).to(dtype)
        # Without a mask (a chunk from position 0) the flash kernel skips the key blocks
        # above the diagonal, which a mask only hides.
        o = F.scaled_dot_product_attention(
            qh, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
        return o[0].transpose(0, 1).reshape(t, self.q_size).to(q.dtype)  # [T, Hq * D]


class MLP:
    """SwiGLU: w2(silu(gate) * up), gate and up from one fused matmul."""

    def __init__(self, w13: Linear, w2: Linear):
        self.w13, self.w2 = w13, w2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.w13, block_kernels.Q4Linear):
            return self.w2(self.w13.swiglu(x))
        gate, up = self.w13(x).chunk(2, dim=-1)  # [N, I] each
        return self.w2(F.silu(gate) * up)


class LlamaModel:
    """Embedding, decoder layers, final norm and LM head, over a packed batch."""

    def __init__(self, config: LlamaConfig, weights: Weights, max_len: int):
        self.config = config
        w = weights.tensors
        #: Activations dtype: bf16 for bf16 and int8 weights (the int8 kernel is ~10x slower
        #: with fp32 activations), fp32 for fp32, fp16 and q4_1 ones.
        self.dtype = torch.float32 if weights.format in ("fp32", "fp16", "q4_1") else torch.bfloat16
        fused = weights.format == "q4_1"  # the block kernels are there, activations fp32
        #: KV cache dtype: the activations', but fp16 where the block kernels read it (q4_1):
        #: a decode step reads every running sequence's keys and values from memory, and on
        #: fp16 a batch-16 step at 512-token contexts took 0.85x the time it took on fp32
        #: (benchmarks/kv_cache_dtype.py). Attention computes in fp32 on fp16's values.
        self.kv_dtype = torch.float16 if fused else self.dtype
        eps = config.rms_norm_eps
        head = "lm_head" if "lm_head" in w or "lm_head.qs" in w else "embed"
        names = [head] + [  # the head first: the largest, so the workers finish together
            f"layers.{n}.{m}" for n in range(config.num_hidden_layers) for m in LAYER_MATMULS
        ]
        # Packing fp16 weights for fbgemm (format fp16) takes ~3 s on one core; it releases the GIL,
        # so one worker per torch thread divides the warm start by as much.
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            linears = dict(zip(names, pool.map(lambda n: _linear(w, n), names), strict=True))
        self.layers = []
        for n in range(config.num_hidden_layers):
            p = f"layers.{n}."
            self.layers.append(
                (
                    RMSNorm(w[p + "attn_norm"].to(self.dtype), eps, fused),
                    Attention(config, n, linears[p + "wqkv"], linears[p + "wo"], fused),
                    RMSNorm(w[p + "ffn_norm"].to(self.dtype), eps, fused),
                    MLP(linears[p + "w13"], linears[p + "w2"]),
                )
            )
        self.norm = RMSNorm(w["norm"].to(self.dtype), eps, fused)
        self.lm_head = linears[head]
        embed = "embed" if "embed" in w or "embed.qs" in w else "lm_head"  # int8 + tied: lm_head
        if embed + ".qs" in w:  # Q8_0 blocks (shared with a tied head): rows dequantised
            self.embed_blocks: block_kernels.Q8Linear | None = block_kernels.Q8Linear(
                w[embed + ".qs"], w[embed + ".d"]
            )
        else:
            self.embed_blocks = None
            self.embed_weight, self.embed_scale = w[embed], w.get(embed + ".scale")
        self.rope = Rotary(config.head_dim, config.rope_theta, max_len, self.dtype)
        self.decode_layers = self._decode_layers() if fused else None

    def _decode_layers(self) -> block_kernels.DecodeLayers | None:
        """The whole model in one C call for small decode steps, when every layer matmul is a
        Q4_1 one and the embedding and head are Q8_0."""
        parts = []
        for attn_norm, attn, ffn_norm, mlp in self.layers:
            linears = (attn.wqkv, attn.wo, mlp.w13, mlp.w2)
            if not all(isinstance(linear, block_kernels.Q4Linear) for linear in linears):
                return None
            parts.append((attn_norm.weight, *linears[:2], ffn_norm.weight, *linears[2:]))
        if self.embed_blocks is None or not isinstance(self.lm_head, block_kernels.Q8Linear):
            return None
        config = self.config
        return block_kernels.DecodeLayers(
            parts,
            self.norm.weight,
            self.embed_blocks,
            self.lm_head,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            eps=config.rms_norm_eps,
        )

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N] ids -> [N, H] in the activation dtype."""
        if self.embed_blocks is not None:
            return self.embed_blocks.rows(token_ids)
        rows = self.embed_weight[token_ids]
        if self.embed_scale is not None:
            return rows.to(self.dtype) * self.embed_scale[token_ids, None]
        return rows.to(self.dtype)

    @property
    def decode_rows(self) -> int:
        """The most tokens ``decode`` takes in one step (0: it does not run here)."""
        return self.decode_layers.ROWS if self.decode_layers is not None else 0

    def decode(
        self,
        token_ids: Sequence[int],
        slots: Sequence[int],
        positions: Sequence[int],
        cache: KVCache,
        int8: bool = True,
    ) -> torch.Tensor:
        """A step of ``decode_rows`` or fewer one-token sequences in one C call: each token
        of ``token_ids`` at its position of ``positions`` in its slot of ``slots`` (N ints
        each) attends to its slot's cache and writes its KV there. Returns float32 logits
        [N, V]. ``int8``: a step whose GEMMs may round x to int8 (``DecodeLayers``)."""
        assert self.decode_layers is not None, "decode needs decode_rows > 0"
        return self.decode_layers(
            token_ids, slots, positions, self.rope.cos, self.rope.sin_signed, cache.k, cache.v,
            int8=int8,
        )  # fmt: skip

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Run the packed tokens [N]; write their KV; return float32 logits [C, V] of
        ``logit_rows`` [C]."""
        x = self.embed(token_ids)  # [N, H], the step's own tensor: added to in place
        cos, sin = self.rope.tables(positions)  # [N, 1, D]
        h = self.layers[0][0](x)
        for n, (_, attn, ffn_norm, mlp) in enumerate(self.layers):
            # Each residual add goes with the norm after it (one call when fused).
            x, h = ffn_norm.add_and_norm(x, attn(h, self.rope, cos, sin, batch, cache))
            if n + 1 < len(self.layers):
                x, h = self.layers[n + 1][0].add_and_norm(x, mlp(h))
            else:
                x = x + mlp(h)
        h = self.norm(x[logit_rows])  # [C, H]: only the rows we sample from
        return self.lm_head(h).float()  # [C, V]


def _linear(w: dict[str, torch.Tensor], name: str) -> Linear:
    if name + ".m" in w:
        return block_kernels.Q4Linear(w[name + ".qs"], w[name + ".d"], w[name + ".m"])
    if name + ".qs" in w:
        return block_kernels.Q8Linear(w[name + ".qs"], w[name + ".d"])
    weight, scale = w[name], w.get(name + ".scale")
    if scale is not None:
        return Int8Linear(weight, scale)
    if weight.dtype == torch.float16:
        return Fp16Linear(weight)
    return lambda x: F.linear(x, weight)


def _select(slots: torch.Tensor, which: torch.Tensor | slice, length: int) -> torch.Tensor:
    """slots[which, :, :length] -> [B, Hkv, length, D]; no copy for a slice."""
    if isinstance(which, slice):
        return slots[which, :, :length]
    return slots[:, :, :length].index_select(0, which)
