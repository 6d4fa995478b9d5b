"""Parse: from an HTTP body (or a WebSocket message) to a validated request model. Every
failure is an ``InvalidRequestError`` (or a subclass) with a message that says what to fix."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tokenspout.errors import InvalidRequestError
from tokenspout.protocols import json_limits
from tokenspout.server.request_body import read_body, require_json
from tokenspout.server.server_state import state_of

Body = TypeVar("Body", bound=BaseModel)


def describe(err: ValidationError) -> str:
    """pydantic's errors as one line a user can act on: ``field: problem; ...``."""
    parts = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


async def parse_body(request: Request, model: type[Body], limit: int) -> Body:
    """A JSON body (415 otherwise) of at most ``limit`` bytes (413), nested no deeper than
    ``--max-json-depth``, valid Unicode, validated as ``model``."""
    require_json(request)
    config = state_of(request).config
    raw = await read_body(request, limit, config.body_timeout_s)
    max_depth = config.max_json_depth
    return validate(model, json_limits.loads(raw, "request body", max_depth))


def validate(model: type[Body], data: object) -> Body:
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]["loc"]
        param = str(first[0]) if first else None
        raise InvalidRequestError(describe(err), param=param) from None
