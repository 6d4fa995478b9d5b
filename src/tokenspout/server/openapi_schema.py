"""The generation endpoints in the OpenAPI schema (``/openapi.json``, ``/docs``).

They are served as plain routes that parse their own bodies (``direct_routes``), so FastAPI
does not see their request models; this adds them, with each field's description and
limits, from the same pydantic models that validate the requests.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest

_BODIES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "Chat completion (OpenAI-compatible)"),
    "/v1/completions": (CompletionRequest, "Text completion (OpenAI-compatible)"),
}
_REF = "#/components/schemas/{model}"


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` include the generation endpoints' request bodies."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, (model, summary) in _BODIES.items():
            body = model.model_json_schema(ref_template=_REF, by_alias=True)
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"].setdefault(path, {})["post"] = {
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
                    },
                },
                "responses": {
                    "200": {"description": "A JSON response, or an SSE stream with stream: true"},
                    "400": {"description": "A field is invalid or cannot be honoured (named)"},
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
