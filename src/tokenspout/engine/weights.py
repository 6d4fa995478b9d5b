"""A model's weights, converted once into the layout ``LlamaModel`` runs, and cached.

Canonical names (``N`` = layer): ``embed`` [V, H]; ``layers.N.attn_norm`` [H];
``layers.N.wqkv`` [(Hq + 2*Hkv) * D, H] (q, k and v fused into one matmul);
``layers.N.wo`` [H, Hq * D]; ``layers.N.ffn_norm`` [H]; ``layers.N.w13`` [2 * I, H]
(gate then up, fused); ``layers.N.w2`` [H, I]; ``norm`` [H]; ``lm_head`` [V, H] (absent when
tied to ``embed``).

Formats: ``fp32``; ``bf16``; ``fp16`` (matmuls run by fbgemm's fp16 GEMM on fp32
activations); ``q4_1`` = llama.cpp's blocks, layer matmuls in Q4_1 and the embedding / LM head
in Q8_0 (``name.qs``, ``name.d``[, ``name.m``]; see ``block_kernels``), kept as the GGUF has
them, quantised here otherwise; ``int8`` = per-output-row symmetric int8 for every matmul
weight (``name`` int8 [N, K] + ``name.scale`` bf16 [N], the operands of
``torch.ops.aten._weight_int8pack_mm``), with ``embed`` dropped when tied (rows are read
back from the int8 ``lm_head``). Norm weights stay fp32 in every format. ``default_format``
picks the fastest one for this CPU.

Dequantising the default GGUF takes ~2 s and quantising another second or two, so the result
is saved as safetensors under ``ModelFiles.cache_dir()``; a warm start reads it back.
"""

from __future__ import annotations

import mmap
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokenspout.engine import block_kernels
from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.weight_formats import FORMATS, WeightFormat
from tokenspout.errors import ModelLoadError

#: The per-layer matmul weights, by canonical name.
LAYER_MATMULS = ("wqkv", "wo", "w13", "w2")
_CACHE_VERSION = 2  # bump when the canonical layout changes (2: block scales fp16)
_BLOCK_PARTS = ("qs", "d", "m")  # a block tensor's parts: ``name.qs``, ``name.d``[, ``name.m``]


class Weights:
    """Named tensors in the canonical layout, in one format."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: WeightFormat):
        self.tensors = tensors
        self.format = fmt

    @classmethod
    def load(cls, files: ModelFiles, config: dict[str, Any], fmt: WeightFormat) -> Weights:
        """Load from the cache, or convert from the model files and fill the cache."""
        if fmt not in FORMATS:
            raise ModelLoadError(f"weights format {fmt!r} is not one of {FORMATS}")
        path = files.cache_dir() / f"weights-v{_CACHE_VERSION}-{fmt}.safetensors"
        if path.is_file():
            # Copy out of safetensors' buffers: they are only 8-byte aligned, and the int8
            # matmul kernel crashes on some unaligned inputs; torch allocates 64-byte aligned.
            cached = load_file(path)
            if fmt == "q4_1":
                return cls(in_huge_pages(cached), fmt)
            return cls({name: t.clone() for name, t in cached.items()}, fmt)
        start = time.perf_counter()
        _progress(f"converting {files.path.name} to {fmt} weights (first start only)...")
        if files.format == "gguf":
            tensors = _read_gguf(files.path, config, keep_blocks=fmt == "q4_1")
        else:
            tensors = _read_safetensors(files.weight_paths, config)
        tied = "lm_head" not in tensors and "lm_head.qs" not in tensors
        tensors = _to_format(tensors, fmt, tied)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp)
        tmp.replace(path)  # atomic: a concurrent start never reads half a file
        _progress(f"weights ready in {time.perf_counter() - start:.1f} s, cached at {path}")
        return cls(in_huge_pages(tensors) if fmt == "q4_1" else tensors, fmt)


_HUGE_PAGE = 2 << 20
_ALIGN = 64


def in_huge_pages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors``, each 64-byte aligned, packed into one anonymous mapping that
    asks for transparent huge pages (``MADV_HUGEPAGE``; this host's THP mode is ``madvise``,
    so torch's own allocations get 4 KB pages).

    A Q4_1 decode step streams all ~100 MB of weights through the caches: in 4 KB pages that
    is ~26,000 pages a step, far more than a core's TLBs hold (2,048 entries on Zen 3). With
    2 MB pages a batch-1 step took 0.95-0.97x the time in 8 of 9 alternating runs (1.07x in
    one), batch 16 0.99-1.03x (benchmarks/weights_huge_pages.py, RESULTS.md). Every byte of
    the mapping is written here, so it costs no more memory than the copies would elsewhere;
    the start pays up to ~0.1 s more (0.04-0.17 s to fault in and copy ~106 MB, against
    0.07 s for torch's clones).
    """
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    padded = {name: -(-n // _ALIGN) * _ALIGN for name, n in sizes.items()}
    total = sum(padded.values())
    # Mapped one huge page larger, so that the arena can start on a 2 MB boundary; the
    # untouched pages before it and after the end cost nothing. Private: a shared anonymous
    # mapping is shmem, which THP's ``madvise`` mode leaves in 4 KB pages.
    buffer = mmap.mmap(-1, total + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        buffer.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(buffer, dtype=torch.uint8)  # keeps the mapping alive
    offset = -arena.data_ptr() % _HUGE_PAGE
    # Faulted in by one parallel write first: a 2 MB page's first touch costs 2.3x a 4 KB
    # one's per byte here, and the copies below are too small for torch to spread.
    arena[offset : offset + total].view(torch.int64).zero_()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        flat = arena[offset : offset + sizes[name]]
        out[name] = flat.view(t.dtype).view(t.shape)
        out[name].copy_(t)
        offset += padded[name]
    return out


def default_format() -> WeightFormat:
    """``q4_1`` where the block kernels run (AVX2 and a C compiler); else ``int8`` where the
    CPU has AVX-512 BF16; else ``fp16``.

    The block kernels read the GGUF's own 4-bit blocks and run a decode step's layers in one
    C call; with AVX-512 VNNI their GEMM does int16 products. On a 2-core AVX-512 EPYC,
    over HTTP, they gave 148 tok/s to one stream and 562 to 16, where the int8 path (torch's
    ``_weight_int8pack_mm`` on bf16 activations) gave 47 and 188 (RESULTS.md, issue 14).
    int8 needs AVX-512 BF16: without it every bf16 op is emulated (a bf16 GEMM ran at 0.9
    GFLOP/s on an AVX2-only EPYC, against 108 for fp32).
    """
    if block_kernels.available():
        return "q4_1"
    return "int8" if torch.cpu._is_avx512_bf16_supported() else "fp16"


def _progress(message: str) -> None:
    print(f"tokenspout: {message}", file=sys.stderr, flush=True)


# A tensor as read: fp32, or a GGUF tensor's blocks kept as they are ({"qs", "d"[, "m"]}).
Raw = np.ndarray | dict[str, np.ndarray]


def _read_gguf(path: Path, config: dict[str, Any], keep_blocks: bool) -> dict[str, torch.Tensor]:
    """Canonical tensors from a GGUF file, dequantised to fp32; with ``keep_blocks``, Q4_1 and
    Q8_0 tensors keep their blocks instead (``name.qs``, ``name.d``[, ``name.m``])."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    splitters = {
        GGMLQuantizationType.Q4_1: block_kernels.split_gguf_q4_1,
        GGMLQuantizationType.Q8_0: block_kernels.split_gguf_q8_0,
    }
    raw: dict[str, Raw] = {}
    reader = GGUFReader(path)
    for i, tensor in enumerate(reader.tensors):
        split = splitters.get(tensor.tensor_type) if keep_blocks else None
        if split is not None:
            cols, rows = (int(x) for x in tensor.shape)  # GGUF lists dims innermost first
            raw[tensor.name] = split(np.asarray(tensor.data).reshape(-1), rows, cols)
        else:
            # dequantize returns [out, in].
            raw[tensor.name] = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if i % 40 == 0:
            _progress(f"  read {i + 1}/{len(reader.tensors)} tensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {"embed": raw.pop("token_embd.weight"), "norm": raw.pop("output_norm.weight")}
    if "output.weight" in raw:
        out["lm_head"] = raw.pop("output.weight")
    for n in range(config["num_hidden_layers"]):
        blk = f"blk.{n}."
        q = _unpermute(raw.pop(blk + "attn_q.weight"), heads)
        k = _unpermute(raw.pop(blk + "attn_k.weight"), kv_heads)
        v = raw.pop(blk + "attn_v.weight")
        out[f"layers.{n}.attn_norm"] = raw.pop(blk + "attn_norm.weight")
        out[f"layers.{n}.wqkv"] = _concat_rows([q, k, v])
        out[f"layers.{n}.wo"] = raw.pop(blk + "attn_output.weight")
        out[f"layers.{n}.ffn_norm"] = raw.pop(blk + "ffn_norm.weight")
        gate, up = raw.pop(blk + "ffn_gate.weight"), raw.pop(blk + "ffn_up.weight")
        out[f"layers.{n}.w13"] = _concat_rows([gate, up])
        out[f"layers.{n}.w2"] = raw.pop(blk + "ffn_down.weight")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in out.items():
        if isinstance(value, dict):
            tensors.update({f"{name}.{part}": torch.from_numpy(a) for part, a in value.items()})
        else:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
    return tensors


def _concat_rows(parts: list[Raw]) -> Raw:
    """Stack tensors by rows; blocks part by part, or fp32 when they do not all have the same
    block type."""
    if all(isinstance(p, dict) for p in parts) and len({tuple(p) for p in parts}) == 1:  # type: ignore[arg-type]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}  # type: ignore[index]
    return np.concatenate([_dequantize(p) for p in parts])


def _dequantize(value: Raw) -> np.ndarray:
    if not isinstance(value, dict):
        return value
    return block_kernels.dequantize({k: torch.from_numpy(a) for k, a in value.items()}).numpy()


def _unpermute(w: Raw, heads: int) -> Raw:
    """Undo llama.cpp's q/k row permutation (of each part, for blocks).

    Its converter reorders each head's rows from Hugging Face's halves layout (rotate_half
    RoPE) to interleaved pairs (GPT-J RoPE); we run the halves layout, as transformers does.
    """
    if isinstance(w, dict):
        return {key: _unpermute(a, heads) for key, a in w.items()}  # type: ignore[misc]
    rows, cols = w.shape
    # w: [heads, D/2, 2, K] (interleaved) -> [heads, 2, D/2, K] (halves)
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _read_safetensors(paths: list[Path], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    raw: dict[str, torch.Tensor] = {}
    for path in paths:
        raw.update(load_file(path))
    raw = {k.removeprefix("model."): v.float() for k, v in raw.items()}
    out = {"embed": raw.pop("embed_tokens.weight"), "norm": raw.pop("norm.weight")}
    if "lm_head.weight" in raw and not config.get("tie_word_embeddings", False):
        out["lm_head"] = raw.pop("lm_head.weight")
    for n in range(config["num_hidden_layers"]):
        p = f"layers.{n}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[p + "attn_norm"] = raw.pop(p + "input_layernorm.weight")
        out[p + "wqkv"] = torch.cat([raw.pop(f"{attn}{x}_proj.weight") for x in "qkv"])
        out[p + "wo"] = raw.pop(attn + "o_proj.weight")
        out[p + "ffn_norm"] = raw.pop(p + "post_attention_layernorm.weight")
        out[p + "w13"] = torch.cat(
            [raw.pop(mlp + "gate_proj.weight"), raw.pop(mlp + "up_proj.weight")]
        )
        out[p + "w2"] = raw.pop(mlp + "down_proj.weight")
    return out


def _to_format(
    tensors: dict[str, torch.Tensor], fmt: WeightFormat, tied: bool
) -> dict[str, torch.Tensor]:
    if fmt == "q4_1":
        return _to_blocks(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        is_matmul = name.rsplit(".", 1)[-1] in LAYER_MATMULS or name in ("lm_head", "embed")
        if not is_matmul or fmt == "fp32":
            out[name] = t.float().contiguous()
        elif fmt in ("bf16", "fp16"):
            out[name] = t.to(torch.bfloat16 if fmt == "bf16" else torch.float16).contiguous()
        elif name != "embed" or not tied:
            out[name], out[name + ".scale"] = _quantize_rows(t)
    if fmt == "int8" and tied:
        out["lm_head"], out["lm_head.scale"] = _quantize_rows(tensors["embed"])
    return out


def _to_blocks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``q4_1`` format: layer matmuls in Q4_1 blocks, the embedding and LM head in Q8_0
    (as llama.cpp's Q4_1 files have them), norms fp32. Blocks read from the file are kept;
    anything else is quantised here."""
    out: dict[str, torch.Tensor] = {}
    bases = {n.rsplit(".", 1)[0] if n.rsplit(".", 1)[-1] in _BLOCK_PARTS else n for n in tensors}
    for base in bases:
        is_layer_matmul = base.rsplit(".", 1)[-1] in LAYER_MATMULS
        kind = "q4_1" if is_layer_matmul else "q8_0" if base in ("embed", "lm_head") else None
        if kind is None:
            out[base] = tensors[base].float().contiguous()
            continue
        parts = {p: tensors[f"{base}.{p}"] for p in _BLOCK_PARTS if f"{base}.{p}" in tensors}
        if parts and ("q4_1" if "m" in parts else "q8_0") == kind:
            out.update({f"{base}.{p}": t for p, t in parts.items()})
            continue
        w = block_kernels.dequantize(parts) if parts else tensors[base]
        quantize = block_kernels.quantize_q4_1 if kind == "q4_1" else block_kernels.quantize_q8_0
        out.update({f"{base}.{p}": t for p, t in quantize(w).items()})
    return out


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None]."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q.contiguous(), scale.to(torch.bfloat16)
