"""The OpenAPI schema documents the generation endpoints' fields."""

from __future__ import annotations

import httpx

from tests.conftest import RunningServer


def test_openapi_documents_the_generation_fields(synthetic_server: RunningServer) -> None:
    schema = httpx.get(f"{synthetic_server.url}/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][ref]["properties"]
    for name in ("response_format", "tools", "tool_choice", "logprobs", "top_logprobs", "n"):
        assert fields[name].get("description"), name
    for name in ("logit_bias", "min_p", "repetition_penalty", "guided_json"):
        assert name in fields
    assert fields["n"]["maximum"] == 8 and fields["structured_outputs"].get("description")
    completion = schema["paths"]["/v1/completions"]["post"]["requestBody"]
    assert completion["content"]["application/json"]["schema"]["$ref"].endswith("CompletionRequest")
    completion_fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion_fields["echo"].get("description")
