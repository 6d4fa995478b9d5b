"""Matmuls on llama.cpp's block-quantised weights (Q4_1, Q8_0): the C kernels and their use.

``block_kernels.c`` is compiled once per machine with the system's C compiler (``make
install`` does it; otherwise the first use does, in well under a second) into the cache
folder, and called through ``ctypes``, which releases the GIL for the call. It needs AVX2
and FMA; ``available()`` says whether this machine can run it, so that the engine falls back
to another weight format where it cannot. With AVX-512 VNNI it is built with the rows and
GEMM of ``block_rows_avx512.h`` and ``block_gemm_avx512.h`` (``ISAS``, ``isa()``).

Why C and not PyTorch: see the header of ``block_kernels.c`` (on an AVX2-only CPU torch's
low-bit kernels are 10-100x slower than the fp16 GEMM, which is bound by memory at batch 1;
on an AVX-512 one its int8 path served 1 stream at 47 tok/s, these kernels at 148).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from tokenspout.engine.model_files import cache_root
from tokenspout.errors import ConfigError

BLOCK = 32  # weights per block, both formats
_SOURCE = Path(__file__).with_name("block_kernels.c")
_HEADERS = tuple(Path(__file__).with_name(f"block_{part}_avx512.h") for part in ("rows", "gemm"))
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

#: The builds: ``avx2`` (fp32 GEMM), ``avx512-vnni`` whose GEMM multiplies int16 x by the
#: weights' integers, 32 products per instruction, and whose kernels take two blocks per
#: instruction (block_gemm_avx512.h, block_rows_avx512.h), and ``avx512-amx``, that build
#: with decode steps' int8 GEMMs in AMX tiles (same results, bit for bit).
ISAS = ("avx2", "avx512-vnni", "avx512-amx")
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
_ISA_FLAGS = {
    "avx2": [],
    "avx512-vnni": _AVX512,
    "avx512-amx": [*_AVX512, "-mamx-tile", "-mamx-int8"],
}
ISA_VARIABLE = "TOKENSPOUT_KERNELS"
#: The builds whose GEMMs can also take x rounded to int8 (VPDPBUSD: 64 products per
#: instruction, twice int16's), which decode steps use: block_gemm_avx512.h says why and
#: where, RESULTS.md what it costs in agreement with the fp32 reference and gains in speed.
INT8_BUILDS = ("avx512-vnni", "avx512-amx")


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The builds this CPU can run (none without AVX2 and FMA). Asked once: every call of
    the per-op kernels finds its library through ``isa()``, and asking torch about the CPU
    (and the kernel for AMX) each time took ~2 µs of that."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return ()
    if not (torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()):
        return ("avx2",)
    # Every CPU with AMX tiles so far has their int8 products too (Sapphire Rapids on);
    # _init_amx asks the kernel to let this process use them.
    if torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx():
        return ISAS
    return ISAS[:2]


def isa() -> str | None:
    """The build in use: ``$TOKENSPOUT_KERNELS`` when set (to compare the builds on one
    machine), else the best this CPU runs; None where it runs none.

    Raises ``ConfigError`` for a build that is unknown or that this CPU cannot run.
    """
    supported = supported_isas()
    wanted = os.environ.get(ISA_VARIABLE)
    if not wanted:
        return supported[-1] if supported else None
    if wanted not in supported:
        runs = ", ".join(supported) or "none"
        raise ConfigError(f"{ISA_VARIABLE}={wanted}: this CPU runs {runs}")
    return wanted


def flags(target: str) -> list[str]:
    """The compiler's flags for the build ``target`` (one of ``ISAS``)."""
    return _FLAGS + _ISA_FLAGS[target]


def library_path(target: str) -> Path:
    """Where the build ``target``'s compiled kernels live: keyed by the sources and flags, so
    an edit rebuilds."""
    sources = b"".join(f.read_bytes() for f in (_SOURCE, *_HEADERS))
    digest = hashlib.sha256(sources + " ".join(flags(target)).encode()).hexdigest()
    return cache_root() / "kernels" / f"block_kernels-{digest[:16]}.so"


def build(target: str | None = None) -> Path:
    """Compile the kernels for the build ``target`` (default: ``isa()``) if they are not
    already; return the library's path.

    Raises ``RuntimeError`` when no compiler is found or the compile fails.
    """
    target = target or isa() or "avx2"
    path = library_path(target)
    if path.is_file():
        return path
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) to build the block kernels")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(path)}.tmp")
    result = subprocess.run(
        [compiler, *flags(target), str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the block kernels failed:\n{result.stderr}")
    tmp.replace(path)  # atomic: a concurrent start never loads half a file
    return path


def cpu_supported() -> bool:
    """Whether this CPU has what the kernels need: AVX2 and FMA (and F16C for the fp16 KV
    cache, which every CPU with AVX2 has)."""
    return bool(supported_isas())


def loaded_isa() -> str | None:
    """The build whose kernels run: the one ``isa()`` names, or the best build below it
    that compiles where that one does not (e.g. with a compiler too old for AMX or AVX-512
    VNNI); None where none runs here."""
    target = isa()
    if target is None:
        return None
    for build in reversed(ISAS[: ISAS.index(target) + 1]):
        if _load(build) is not None:
            return build
    return None


def _library() -> ctypes.CDLL | None:
    target = loaded_isa()
    return None if target is None else _load(target)


@functools.cache
def _load(target: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build(target)))
    except (OSError, RuntimeError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.q4_1_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.q8_0_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr]
    lib.q4_1_gemm.argtypes = lib.q4_1_linear.argtypes
    lib.q8_0_gemm.argtypes = lib.q8_0_linear.argtypes
    lib.q4_1_gemm_swiglu.argtypes = lib.q4_1_linear.argtypes
    lib.q4_1_gemm_int8.argtypes = lib.q4_1_linear.argtypes
    lib.q4_1_gemm_swiglu_int8.argtypes = lib.q4_1_linear.argtypes
    lib.q8_0_gemm_int8.argtypes = lib.q8_0_linear.argtypes
    lib.q4_1_to_bf16.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.q4_1_to_bf16.restype = None
    lib.swiglu_bf16.argtypes = [ptr, i64, i64, ptr]
    lib.swiglu_bf16.restype = None
    for name in ("q4_1_linear", "q8_0_linear", "q4_1_gemm", "q8_0_gemm", "q4_1_gemm_swiglu"):
        getattr(lib, name).restype = ctypes.c_int
        if name.endswith(("gemm", "swiglu")):
            getattr(lib, name + "_int8").restype = ctypes.c_int
    lib.add_rms_norm.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_float, ptr]
    lib.add_rms_norm.restype = None
    lib.rope_and_store.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.rope_and_store.restype = None
    lib.decode_layers.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.decode_layers.argtypes += [ptr, i64, ptr, ptr]
    lib.decode_layers.argtypes += [ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ptr]
    lib.decode_layers.argtypes += [i64, i64, ptr]
    lib.decode_layers.restype = ctypes.c_int
    lib.sample_rows.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr]
    lib.sample_rows.restype = ctypes.c_int
    return lib


def _loaded(user: str) -> ctypes.CDLL:
    lib = _library()
    assert lib is not None, f"{user} needs block_kernels.available()"
    return lib


def available() -> bool:
    """Whether the kernels run here: a CPU with AVX2 and FMA, and a compiler or a prior build."""
    return _library() is not None


def _int8(wanted: bool) -> bool:
    """Whether to run a GEMM with int8 x: ``wanted``, which the loaded build must offer."""
    if wanted and loaded_isa() not in INT8_BUILDS:
        raise ValueError(f"int8 GEMMs need one of the builds {', '.join(INT8_BUILDS)}")
    return wanted


class _BlockLinear:
    """x @ W.T by the C code, on W's block tensors (weight-sized, then d[, m]): the kernel up
    to ``KERNEL_ROWS`` rows of x, the GEMM above.

    At 1-2 rows a matmul is bound by reading the weights, and the kernel reads the blocks
    themselves; with more rows the GEMM's register tiling does fewer instructions per
    product. Measured (benchmarks/block_kernels.py, RESULTS.md): see ``KERNEL_ROWS``.
    """

    KERNEL_ROWS = 2

    def __init__(self, kernel: str, qs: torch.Tensor, *scales: torch.Tensor):
        if any(t.dtype != torch.float16 for t in scales):
            # The C code reads them as raw fp16: anything else would be read as garbage.
            raise ValueError("block weights' scales and minimums must be fp16")
        self.blocks = (qs.contiguous(), *(t.contiguous() for t in scales))
        self.n, self.k = scales[0].shape[0], scales[0].shape[1] * BLOCK
        lib = _loaded(type(self).__name__)
        self._kernel = getattr(lib, kernel + "_linear")
        self._gemm = getattr(lib, kernel + "_gemm")
        self._gemm_int8 = getattr(lib, kernel + "_gemm_int8")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x fp32 [M, K] -> [M, N], by the kernel or the GEMM as M asks."""
        return self.kernel(x) if x.shape[0] <= self.KERNEL_ROWS else self.gemm(x)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x fp32 [M, K] -> [M, N] by the block kernel (x rounded to int16 per block)."""
        return self._run(self._kernel, x)

    def gemm(self, x: torch.Tensor, int8: bool = False) -> torch.Tensor:
        """x fp32 [M, K] -> [M, N] by the GEMM: as the build computes prefills (fp32 on the
        dequantised weights, or x rounded to int16 per block), or with ``int8`` as decode
        steps' GEMMs do (x rounded to int8 per block; ``INT8_BUILDS`` only)."""
        return self._run(self._gemm_int8 if _int8(int8) else self._gemm, x)

    def _run(
        self, call: ctypes._CFuncPtr, x: torch.Tensor, width: int | None = None
    ) -> torch.Tensor:
        """``call`` on x and the blocks -> [M, width] (default N: the weight's rows)."""
        x = _check(x, self.k)
        width = self.n if width is None else width
        y = torch.empty(x.shape[0], width)
        blocks = [t.data_ptr() for t in self.blocks]
        if call(x.data_ptr(), x.shape[0], self.k, *blocks, width, y.data_ptr()) != 0:
            raise MemoryError("block kernel: no memory for the quantised or packed activations")
        return y


def amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles (torch's oneDNN GEMM uses them):
    the CPU has them and the kernel lets this process use them (``_init_amx`` asks it, as
    oneDNN would; a kernel or VM that refuses leaves oneDNN on slower paths)."""
    return torch.cpu._is_avx512_bf16_supported() and torch.cpu._init_amx()


class Q4Linear(_BlockLinear):
    """Q4_1 weights (w = q * d + m per block of 32): ``qs`` uint8 [N, K/2] (GGUF's nibble
    order), ``d`` and ``m`` fp16 [N, K/32]."""

    #: From how many rows of x a matmul runs in bf16 (x and the weights rounded to bf16,
    #: products summed in fp32, the result rounded to bf16) by torch's GEMM on the weights
    #: unpacked for the call (``bf16_weights``), instead of the block GEMM; None: never. Set
    #: where the CPU has AMX, whose tiles took a layer's matmuls at 48 rows in 0.79x the
    #: block GEMM's time and at 128-256 rows in 0.44-0.47x; 32 rows broke even
    #: (benchmarks/bf16_prefill.py, RESULTS.md). Prompt chunks of as many rows attend in
    #: bf16 too (``llama_model.Attention``).
    BF16_ROWS: ClassVar[int | None] = 48 if amx_bf16() else None

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        super().__init__("q4_1", qs, d, m)
        self._swiglu = _loaded(type(self).__name__).q4_1_gemm_swiglu
        self._swiglu_int8 = _loaded(type(self).__name__).q4_1_gemm_swiglu_int8
        self._to_bf16 = _loaded(type(self).__name__).q4_1_to_bf16
        self._swiglu_bf16 = _loaded(type(self).__name__).swiglu_bf16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x fp32 [M, K] -> [M, N], in bf16 from ``BF16_ROWS`` rows, else as the blocks'."""
        if self._in_bf16(x):
            return self._bf16(x).float()
        return super().__call__(x)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weights [N, K]."""
        return dequantize_q4_1(*self.blocks)

    def bf16_weights(self) -> torch.Tensor:
        """The weights as bf16 [N, K] (q * d + m in fp32, rounded to nearest even), unpacked
        into this thread's scratch buffer: valid until the thread's next call."""
        out = _bf16_scratch(self.n * self.k).view(self.n, self.k)
        self._to_bf16(*(t.data_ptr() for t in self.blocks), self.n, self.k, out.data_ptr())
        return out

    def _in_bf16(self, x: torch.Tensor) -> bool:
        return self.BF16_ROWS is not None and x.shape[0] >= self.BF16_ROWS

    def _bf16(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_check(x, self.k).to(torch.bfloat16), self.bf16_weights())

    def swiglu(self, x: torch.Tensor, int8: bool = False) -> torch.Tensor:
        """x fp32 [M, K] -> silu(gate) * up [M, N / 2], for W's first N / 2 rows the gate's
        and the rest the up projection's (a fused MLP input matmul). From ``KERNEL_ROWS`` + 1
        rows in one GEMM call, whose panels apply SiLU and the product before they write;
        below, by the kernel and two torch ops; from ``BF16_ROWS`` in bf16, then SiLU and the
        product in one C pass. ``int8``: by the GEMM with int8 x, whatever the rows (as
        ``gemm``)."""
        if _int8(int8):
            return self._run(self._swiglu_int8, x, self.n // 2)
        if self._in_bf16(x):
            product = self._bf16(x)
            act = torch.empty(x.shape[0], self.n // 2)
            self._swiglu_bf16(product.data_ptr(), x.shape[0], self.n // 2, act.data_ptr())
            return act
        if x.shape[0] <= self.KERNEL_ROWS:
            gate, up = self.kernel(x).chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        return self._run(self._swiglu, x, self.n // 2)


_scratch = threading.local()


def _bf16_scratch(numel: int) -> torch.Tensor:
    """This thread's bf16 buffer of at least ``numel`` elements: unpacked weights reuse one
    buffer (a fresh allocation per matmul would fault in its pages each time)."""
    buffer: torch.Tensor | None = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffer = torch.empty(numel, dtype=torch.bfloat16)
    return buffer[:numel]


class Q8Linear(_BlockLinear):
    """Q8_0 weights (w = q * d per block of 32): ``qs`` int8 [N, K], ``d`` fp16 [N, K/32].
    Also gives rows back, for an embedding tied to the LM head."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor):
        super().__init__("q8_0", qs, d)
        self.qs, self.d = self.blocks

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The fp32 weight rows ``ids`` [T] -> [T, K]."""
        return dequantize_q8_0(self.qs[ids], self.d[ids])


class DecodeLayers:
    """A decode step of up to ``ROWS`` tokens in one C call (``decode_layers``): embedding
    rows, decoder layers, final norm and LM head, on Q4_1 layers, a Q8_0 embedding and head
    and an fp16 KV cache.

    Per layer the per-op path is ~20 small torch ops and ctypes calls of a few µs each, ~5 ms
    of a ~15 ms batch-1 step; here the layers run in one OpenMP region, a barrier after each
    matmul (benchmarks/RESULTS.md, issue 14). The embedding and the head come in too: after
    the weights have streamed through the caches, the few torch ops around them ran cold,
    ~0.2 ms a step.
    """

    ROWS = 64  # the C function's MAX_M
    #: Per build, from how many tokens on the matmuls run as GEMMs on weights unpacked a
    #: panel at a time rather than by the block kernels (at most the C side's MAX_M_KERNEL
    #: + 1 = 17). Measured (RESULTS.md): 8 for AVX2; 7 for AVX-512 with its int8 GEMMs,
    #: which took 7 tokens in 0.86-0.94x the kernels' time and 6 in 0.96-1.05x (9 when its
    #: GEMMs were int16). An instance's ``gemm_rows`` is its loaded build's
    #: (benchmarks/gemm_rows.py sets it).
    GEMM_ROWS: ClassVar[dict[str, int]] = {"avx2": 8, "avx512-vnni": 7, "avx512-amx": 7}
    MAX_HEAD_DIM = 256  # the C function's stack buffers

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, Q4Linear, Q4Linear, torch.Tensor, Q4Linear, Q4Linear]],
        final_norm: torch.Tensor,
        embed: Q8Linear,
        head: Q8Linear,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        int8: bool = True,
    ):
        """``layers``: per layer (attn_norm, wqkv, wo, ffn_norm, w13, w2); norms fp32 [H];
        ``embed`` [vocab, H] and ``head`` [V, H]. ``int8``: steps of ``gemm_rows`` tokens or
        more round the matmuls' inputs to int8 where the build can (``INT8_BUILDS``), else
        as prefills do."""
        if head_dim % 64 or head_dim > self.MAX_HEAD_DIM or heads % kv_heads:
            raise ValueError(f"decode_layers cannot run head_dim {head_dim}, {heads}/{kv_heads}")
        self._call = _loaded(type(self).__name__).decode_layers
        self.gemm_rows = self.GEMM_ROWS[str(loaded_isa())]
        #: Whether steps of ``gemm_rows`` tokens or more round x to int8.
        self.int8 = int8 and loaded_isa() in INT8_BUILDS
        # Kept alive here: the C side gets their addresses only.
        self._norms = [t.float().contiguous() for t, *_ in layers] + [
            t.float().contiguous() for _, _, _, t, *_ in layers
        ]
        self._final = final_norm.float().contiguous()
        self._embed, self._head = embed, head
        self._linears = [linears for _, *linears in layers]  # their blocks, as the norms
        pointers: list[int] = []
        for n, (_, wqkv, wo, _, w13, w2) in enumerate(layers):
            pointers.append(self._norms[n].data_ptr())
            pointers += [t.data_ptr() for t in (*wqkv.blocks, *wo.blocks)]
            pointers.append(self._norms[len(layers) + n].data_ptr())
            pointers += [t.data_ptr() for t in (*w13.blocks, *w2.blocks)]
        self._layers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.hidden, self.vocab = wqkv.k, head.n
        if embed.k != self.hidden or head.k != self.hidden:
            raise ValueError("decode_layers: the embedding and head must be [*, hidden]")
        self._embed_blocks = (embed.qs.data_ptr(), embed.d.data_ptr())
        self._rest = (len(layers), self._final.data_ptr(), head.qs.data_ptr(), head.d.data_ptr())
        self._rest += (self.vocab, self.hidden, heads, kv_heads, head_dim, w13.n // 2, eps)

    def __call__(
        self,
        ids: Sequence[int],
        slots: Sequence[int],
        positions: Sequence[int],
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        int8: bool = True,
    ) -> torch.Tensor:
        """Logits fp32 [M, V] of M <= ROWS tokens ``ids`` at ``slots``, ``positions`` (M ints
        each); ``cos``, ``sin_signed``: RoPE's whole tables [max_len, D] (``Rotary``); the
        caches of all layers, fp16 [L, slots, Hkv, max_len, D], get each token's k and v.
        ``int8`` false: this step's GEMMs keep int16 x whatever ``self.int8`` says (a step
        with a prompt's last token, which picks an answer's first token).

        The ids, slots and positions go in as ctypes arrays, not tensors: right after a step
        torch's code is cold, and packing them as tensors cost ~0.2 ms of a ~10 ms batch-1
        step (timed alternately in one process; benchmarks/step_overhead.py)."""
        m = len(ids)
        if not 1 <= m <= self.ROWS or len(slots) != m or len(positions) != m:
            raise ValueError(
                f"decode_layers runs 1..{self.ROWS} tokens, one slot and position each"
            )
        if cos.shape[0] < k_cache.shape[3] or sin_signed.shape != cos.shape:
            raise ValueError("decode_layers wants RoPE tables for every cache position")
        if k_cache.dtype != torch.float16 or v_cache.dtype != torch.float16:
            raise ValueError("decode_layers wants an fp16 KV cache")
        rows = ctypes.c_int64 * m
        logits = torch.empty(m, self.vocab)
        status = self._call(
            rows(*ids), m, self.gemm_rows, self.int8 and int8, *self._embed_blocks, rows(*slots),
            rows(*positions),
            cos.data_ptr(), sin_signed.data_ptr(), self._layers, *self._rest,
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], k_cache.shape[3],
            logits.data_ptr(),
        )  # fmt: skip
        if status == -2:
            raise ValueError(f"decode_layers runs 1..{self.ROWS} tokens")
        if status != 0:
            raise MemoryError("decode_layers: no memory for its scratch buffers")
        return logits


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x += delta`` in place (a residual add; skipped for None), then RMSNorm of x by
    ``weight``: fp32 [M, H] contiguous, returned as a new tensor."""
    lib = _loaded("add_rms_norm")
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("add_rms_norm wants contiguous fp32 rows")
    out = torch.empty_like(x)
    if delta is not None:
        delta = _check(delta, x.shape[1])
    lib.add_rms_norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(), x.shape[0], x.shape[1],
        weight.data_ptr(), eps, out.data_ptr(),
    )  # fmt: skip
    return out


def rope_and_store(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """RoPE on the q and k heads of ``qkv`` [N, (heads + 2 * kv_heads) * D] in place, then k
    and v into ``k_cache``/``v_cache`` (one layer, contiguous, fp16) at ``rows`` [N * kv_heads]
    (``KVCache.rows``). ``cos``/``sin_signed``: each token's table rows [N, D] (``Rotary``)."""
    lib = _loaded("rope_and_store")
    n, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (qkv, cos, sin_signed)):
        raise ValueError("rope_and_store wants contiguous fp32 qkv and tables")
    if any(t.dtype != torch.float16 or not t.is_contiguous() for t in (k_cache, v_cache)):
        raise ValueError("rope_and_store wants a contiguous fp16 KV cache")
    if d % 8:
        raise ValueError(f"rope_and_store runs head_dim a multiple of 8, not {d}")
    if cos.shape != (n, d) or sin_signed.shape != (n, d) or rows.shape != (n * kv_heads,):
        raise ValueError("rope_and_store: tables must be [N, D] and rows [N * kv_heads]")
    rows = rows.contiguous()
    lib.rope_and_store(
        qkv.data_ptr(), n, heads, kv_heads, d, cos.data_ptr(), sin_signed.data_ptr(),
        rows.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
    )  # fmt: skip


def sample_rows(
    logits: torch.Tensor, rows: list[int], temperatures: list[float], uniforms: list[float]
) -> list[int]:
    """Inverse-CDF sampling of ``logits[rows]`` (fp32 [*, V]) at ``temperatures`` (> 0), one
    uniform in [0, 1) per row: per row the first token whose running probability exceeds
    its uniform; -inf logits have none. What ``softmax(x / T).cumsum()`` and
    ``searchsorted`` do, without their [rows, V] tensors."""
    lib = _loaded("sample_rows")
    if logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError("sample_rows wants contiguous fp32 [rows, vocab] logits")
    if not all(0 <= r < logits.shape[0] for r in rows):
        raise ValueError("sample_rows: a row outside the logits")
    n = len(rows)
    if len(temperatures) != n or len(uniforms) != n:
        raise ValueError("sample_rows: one temperature and one uniform per row")
    # ctypes arrays, not torch tensors: right after a decode step torch's code is cold, and
    # four small tensors took ~130 µs there, these ~30.
    out = (ctypes.c_int64 * n)()
    status = lib.sample_rows(
        logits.data_ptr(), logits.shape[1], (ctypes.c_int64 * n)(*rows), n,
        (ctypes.c_float * n)(*temperatures), (ctypes.c_float * n)(*uniforms), out,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("sample_rows: no memory for its block sums")
    return list(out)


def _check(x: torch.Tensor, k: int) -> torch.Tensor:
    # The kernel reads raw fp32 memory: anything else would be read as garbage, not refused.
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"block kernel wants fp32 [M, {k}], got {x.dtype} {list(x.shape)}")
    return x.contiguous()


def dequantize(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 [N, K] from either format's parts: Q4_1 {qs, d, m}, or Q8_0 {qs, d}."""
    if "m" in blocks:
        return dequantize_q4_1(blocks["qs"], blocks["d"], blocks["m"])
    return dequantize_q8_0(blocks["qs"], blocks["d"])


def dequantize_q8_0(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from Q8_0 blocks."""
    n, nb = d.shape
    return (qs.view(n, nb, BLOCK).float() * d.float()[..., None]).view(n, nb * BLOCK)


def dequantize_q4_1(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from Q4_1 blocks (the same arithmetic as the kernel and gguf-py)."""
    n, nb = d.shape
    blocks = qs.view(n, nb, BLOCK // 2)
    q = torch.cat((blocks & 0x0F, blocks >> 4), dim=-1).float()  # [N, nb, 32]
    return (q * d.float()[..., None] + m.float()[..., None]).view(n, nb * BLOCK)


def split_gguf_q4_1(raw: np.ndarray, rows: int, cols: int) -> dict[str, np.ndarray]:
    """GGUF Q4_1 bytes of a [rows, cols] tensor -> ``qs``, ``d``, ``m`` (see Q4Linear)."""
    blocks = raw.reshape(rows, cols // BLOCK, 20)  # fp16 d, fp16 m, 16 bytes of nibbles
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    qs = np.ascontiguousarray(blocks[..., 4:]).reshape(rows, cols // 2)
    return {"qs": qs, "d": d, "m": m}


def split_gguf_q8_0(raw: np.ndarray, rows: int, cols: int) -> dict[str, np.ndarray]:
    """GGUF Q8_0 bytes of a [rows, cols] tensor -> ``qs``, ``d`` (see Q8Linear)."""
    blocks = raw.reshape(rows, cols // BLOCK, 34)  # fp16 d, 32 int8
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols)
    return {"qs": qs, "d": d}


def quantize_q4_1(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q4_1 blocks of fp32 weights [N, K] (as llama.cpp quantises: the block's min and range
    over 15 steps, computed in fp32 and stored as fp16), for weights that do not come as Q4_1
    in the model file."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // BLOCK, BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((blocks - lo[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
    qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return {"qs": qs.reshape(n, k // 2).contiguous(), "d": d.half(), "m": lo.half()}


def quantize_q8_0(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q8_0 blocks of fp32 weights [N, K]: scale max|w| / 127 per block (stored as fp16)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (blocks * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
    return {"qs": q.reshape(n, k).contiguous(), "d": d.half()}
