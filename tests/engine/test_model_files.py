"""Resolving --model, and the errors for what cannot be loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tokenspout.engine import model_files
from tokenspout.engine.model_files import DEFAULT_FILE, ModelFiles
from tokenspout.engine.model_runner import ModelRunner, SeqChunk
from tokenspout.engine.tokenizer import CHATML_TEMPLATE
from tokenspout.errors import ModelLoadError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSPOUT_CACHE", str(tmp_path / "cache"))


def test_default_model() -> None:
    files = ModelFiles.resolve(None)
    assert files.format == "gguf"
    assert files.path.name == DEFAULT_FILE
    assert files.model_id == "SmolLM2-135M-Instruct"


def test_gguf_path_and_its_cache_key(tmp_path: Path) -> None:
    default = ModelFiles.resolve(None)
    files = ModelFiles.resolve(str(default.path))
    assert files == default
    assert files.cache_dir().parent == tmp_path / "cache"
    assert files.cache_dir() == default.cache_dir()  # the key is stable


def test_cache_key_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    before = ModelFiles.resolve(str(path)).cache_dir()
    path.write_bytes(b"GGUF" + bytes(99) + b"x")
    assert ModelFiles.resolve(str(path)).cache_dir() != before


def test_a_files_digest_is_kept_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    first = ModelFiles.resolve(str(path)).cache_dir()
    # A new process: nothing in memory; the unchanged file is not read again.
    model_files._hash_once.cache_clear()
    monkeypatch.setattr(model_files, "_hash_file", lambda *_: pytest.fail("hashed again"))
    assert ModelFiles.resolve(str(path)).cache_dir() == first
    monkeypatch.undo()
    monkeypatch.setenv("TOKENSPOUT_CACHE", str(tmp_path / "cache"))
    path.write_bytes(b"GGUF" + bytes(99) + b"x")  # rewritten: a new mtime, hashed again
    assert ModelFiles.resolve(str(path)).cache_dir() != first


def test_metadata_is_cached() -> None:
    files = ModelFiles.resolve(None)
    meta = files.metadata()
    assert (files.cache_dir() / "meta.json").is_file()
    assert files.metadata() == meta
    assert meta["config"]["num_hidden_layers"] == 30


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.gguf", "does not exist"),
        (lambda p: (p / "x.bin").write_bytes(b"not a model") and p / "x.bin", "not a GGUF"),
        (lambda p: p, "no config.json"),
    ],
    ids=["missing", "not-gguf", "empty-dir"],
)
def test_unloadable_paths(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as err:
        ModelFiles.resolve(str(make(tmp_path)))
    assert "expected" in err.value.message


def test_directory_without_tokenizer_or_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        ModelFiles.resolve(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="safetensors"):
        ModelFiles.resolve(str(tmp_path))


def test_gguf_of_another_architecture(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(path, "gpt2")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'"):
        ModelFiles.resolve(str(path)).metadata()


def test_directory_of_another_model_type(tmp_path: Path) -> None:
    _write_tiny_hf_model(tmp_path, model_type="qwen2")
    with pytest.raises(ModelLoadError, match="model_type 'qwen2'"):
        ModelRunner(str(tmp_path), weights="fp32", num_slots=1, max_model_len=16)


def test_hugging_face_directory_runs(tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama"
    model.mkdir()
    _write_tiny_hf_model(model, model_type="llama")
    runner = ModelRunner(str(model), weights="fp32", num_slots=2, max_model_len=32)
    assert runner.model_id == "tiny-llama"
    assert runner.vocab_size == 49152
    prompt = runner.tokenizer.encode("Hello world, 123")
    one_shot = runner.forward([SeqChunk(0, prompt, 0)])
    runner.forward([SeqChunk(1, prompt[:3], 0)])
    chunked = runner.forward([SeqChunk(1, prompt[3:], 3)])
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=0)


def _write_tiny_hf_model(path: Path, model_type: str) -> None:
    """A random 2-layer llama in Hugging Face layout, with the default model's tokenizer."""
    from tokenspout.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_metadata(ModelFiles.resolve(None).metadata()["tokenizer"])
    tokenizer._backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>"})
    )
    h, i, layers, heads, kv, vocab = 64, 128, 2, 4, 2, 49152
    config = {
        "model_type": model_type,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    d = h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    save_file(
        {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()},
        path / "model.safetensors",
    )
