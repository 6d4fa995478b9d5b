"""The OpenAPI schema as the routes really behave: the request bodies the generation and
telemetry handlers parse themselves, their query parameters, and the error answers.

The generation endpoints parse their bodies by hand (``direct_routes``), so FastAPI cannot
see them; without this the schema said they took nothing and answered only 200, and a
schema-driven fuzzer (the attack suite runs schemathesis) could test nothing real.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from tokenspout.server.responses_schema import ResponsesRequest
from tokenspout.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SeedStreamRequest,
    TokenizeRequest,
)
from tokenspout.server.telemetry_routes import ClientTelemetry

_REF = "#/components/schemas/{model}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "The request is invalid; the message names the field.",
    "401": "Missing or wrong API key.",
    "403": "The key may not use this model, or the page's origin is not allowed.",
    "404": "No such model or stream (another key's stream is not found either).",
    "405": "Wrong method.",
    "409": "The stream was not opened resumable: it takes no second reader.",
    "410": "The stream expired.",
    "413": "Body larger than the limit.",
    "415": "Body is not application/json, or has a Content-Encoding.",
    "429": "Over a limit (the server's or the key's); see Retry-After.",
    "503": "Loading, shutting down, or too many connections.",
}
#: One SSE event (``data`` is a JSON chunk or ``[DONE]``), and one NDJSON line.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "id": {"type": "string"}},
}
_STREAMING = {
    "text/event-stream": {"schema": _SSE_EVENT},
    "application/x-ndjson": {"schema": {"type": "object"}},
}
_COMPLETION_OBJECT = {
    "type": "object",
    "required": ["id", "object", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
    },
}

_RESPONSE_OBJECT = {
    "type": "object",
    "required": ["id", "object", "status", "output"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["response"]},
        "status": {"type": "string"},
        "output": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
    },
}


def _param(
    name: str, schema: dict[str, Any], *, where: str = "query", required: bool = False
) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


_SEED_QUERY = [
    _param("prompt", {"type": "string"}, required=True),
    _param("max_tokens", {"type": "integer", "minimum": 1}),
    _param("seed", {"type": "integer"}),
    _param("temperature", {"type": "number", "minimum": 0, "maximum": 2}),
    _param("flush_tokens", {"type": "integer", "minimum": 1}),
    _param("flush_ms", {"type": "number", "minimum": 0, "maximum": 10_000}),
    _param("resumable", {"type": "string", "enum": ["true", "false", "1", "0"]}),
    _param("model", {"type": "string"}),
    _param("last_event_id", {"type": "string"}),
    _param("stream_event", {"type": "string", "enum": ["true", "false", "1", "0"]}),
]
_RESUME = [
    _param("last_event_id", {"type": "string"}),
    _param("Last-Event-ID", {"type": "string"}, where="header"),
]

#: (method, path) -> (request body model, query parameters, 200 content, error statuses).
_OPERATIONS: dict[tuple[str, str], tuple[type[BaseModel] | None, list, dict, str]] = {
    ("post", "/v1/chat/completions"): (
        ChatCompletionRequest,
        [],
        {"application/json": {"schema": _COMPLETION_OBJECT}, **_STREAMING},
        "400 401 403 404 413 415 429 503",
    ),
    ("post", "/v1/completions"): (
        CompletionRequest,
        [],
        {"application/json": {"schema": _COMPLETION_OBJECT}, **_STREAMING},
        "400 401 403 404 413 415 429 503",
    ),
    ("post", "/v1/responses"): (
        ResponsesRequest,
        [],
        {"application/json": {"schema": _RESPONSE_OBJECT}, **_STREAMING},
        "400 401 403 404 413 415 429 503",
    ),
    ("post", "/v1/completions/stream"): (
        SeedStreamRequest,
        [],
        _STREAMING,
        "400 401 403 404 413 415 429 503",
    ),
    ("get", "/v1/completions/stream"): (
        None,
        _SEED_QUERY,
        _STREAMING,
        "400 401 403 404 409 410 429 503",
    ),
    ("get", "/v1/streams/{stream_id}"): (None, _RESUME, _STREAMING, "400 401 404 409 410"),
    ("post", "/v1/streams/{stream_id}/cancel"): (
        None,
        [],
        {"application/json": {"schema": {"type": "object"}}},
        "401 404 415",
    ),
    ("post", "/v1/telemetry"): (ClientTelemetry, [], {}, "400 401 413 415"),
    ("get", "/v1/models"): (None, [], {"application/json": {"schema": {"type": "object"}}}, "401"),
    ("get", "/v1/models/{model_id}"): (
        None,
        [],
        {"application/json": {"schema": {"type": "object"}}},
        "401 404",
    ),
    ("post", "/tokenize"): (
        TokenizeRequest,
        [],
        {"application/json": {"schema": {"type": "object"}}},
        "400 401 403 404 413 415",
    ),
    ("post", "/detokenize"): (
        DetokenizeRequest,
        [],
        {"application/json": {"schema": {"type": "object"}}},
        "400 401 403 404 413 415",
    ),
    ("get", "/health"): (None, [], {"application/json": {"schema": {"type": "object"}}}, "503"),
    ("get", "/metrics"): (None, [], {"text/plain": {"schema": {"type": "string"}}}, "401"),
}


def describe(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the real bodies, parameters and answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR_SCHEMA
        for (method, path), (body, params, ok, errors) in _OPERATIONS.items():
            operation = schema["paths"][path][method]
            if body is not None:
                json_schema = body.model_json_schema(ref_template=_REF)
                components.update(json_schema.pop("$defs", {}))
                components[body.__name__] = json_schema
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model=body.__name__)}}
                    },
                }
            known = {(p["name"], p["in"]) for p in operation.get("parameters", [])}
            extra = [p for p in params if (p["name"], p["in"]) not in known]
            operation["parameters"] = [*operation.get("parameters", []), *extra]
            responses: dict[str, Any] = {}
            if ok:
                responses["200"] = {"description": "OK", "content": ok}
            else:
                responses["204"] = {"description": "Recorded."}
            error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            for status in errors.split():
                responses[status] = {"description": _ERRORS[status], "content": error}
            operation["responses"] = responses
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
