"""The context length an upstream's ``/models`` entry gives, in each server's own words,
and none where the entry does not say."""

from __future__ import annotations

import pytest

from tokenspout.engine.upstream_server import context_length


@pytest.mark.parametrize(
    ("entry", "length"),
    [
        ({"id": "m", "max_model_len": 4096}, 4096),  # vLLM, SGLang, tokenspout
        ({"id": "m", "meta": {"n_vocab": 49152, "n_ctx_train": 8192}}, 8192),  # llama.cpp
        ({"id": "m", "context_length": 131072}, 131072),  # OpenRouter-style hosted APIs
        ({"id": "m", "max_model_len": 2048, "meta": {"n_ctx_train": 8192}}, 2048),
        ({"id": "m"}, None),  # Ollama, TGI, OpenAI: nothing to report
        ({"id": "m", "max_model_len": None}, None),
        ({"id": "m", "max_model_len": "4096"}, None),
        ({"id": "m", "max_model_len": 0}, None),
        ({"id": "m", "max_model_len": True}, None),
        ({"id": "m", "meta": None}, None),
        ({"id": "m", "meta": {"n_ctx_train": -1}}, None),
    ],
)
def test_context_length_of_a_models_entry(entry: dict, length: int | None) -> None:
    assert context_length(entry) == length
