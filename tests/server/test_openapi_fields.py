"""The OpenAPI schema documents the generation endpoints' fields."""

from __future__ import annotations

import httpx

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine


def test_openapi_documents_the_generation_fields(synthetic_server: RunningServer) -> None:
    schema = httpx.get(f"{synthetic_server.url}/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][ref]["properties"]
    for name in ("response_format", "tools", "tool_choice", "logprobs", "top_logprobs", "n"):
        assert fields[name].get("description"), name
    for name in ("logit_bias", "min_p", "repetition_penalty", "guided_json"):
        assert name in fields
    assert fields["n"]["anyOf"][0]["maximum"] == 8
    assert fields["structured_outputs"].get("description")
    completion = schema["paths"]["/v1/completions"]["post"]["requestBody"]
    assert completion["content"]["application/json"]["schema"]["$ref"].endswith("CompletionRequest")
    completion_fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion_fields["echo"].get("description")


def test_every_optional_field_is_nullable_as_the_server_accepts_it(start_server) -> None:  # type: ignore[no-untyped-def]
    """A null is a field not given (``_null_is_unset``): the schema says so, and the server
    takes each optional field as null."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=0), default_max_tokens=2)
    schema = httpx.get(f"{server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for model, path, base in (
        ("ChatCompletionRequest", "/v1/chat/completions", chat),
        ("CompletionRequest", "/v1/completions", {"prompt": "hi"}),
    ):
        definition = components[model]
        optional = set(definition["properties"]) - set(definition["required"])
        assert {"temperature", "stream", "max_tokens", "n"} <= optional
        for name in sorted(optional):
            field = definition["properties"][name]
            assert {"type": "null"} in field["anyOf"], (model, name)
            answer = httpx.post(f"{server.url}{path}", json={**base, name: None})
            assert answer.status_code == 200, (model, name, answer.text)
