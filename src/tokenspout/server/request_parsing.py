"""Parse: from an HTTP body (or a WebSocket message) to a validated request model. Every
failure is an ``InvalidRequestError`` (or a subclass) with a message that says what to fix."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tokenspout.errors import InvalidRequestError

Body = TypeVar("Body", bound=BaseModel)


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "payload_too_large"


def describe(err: ValidationError) -> str:
    """pydantic's errors as one line a user can act on: ``field: problem; ...``."""
    parts = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


async def parse_body(request: Request, model: type[Body], limit: int) -> Body:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    return validate(model, data)


def validate(model: type[Body], data: object) -> Body:
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise InvalidRequestError(describe(err)) from None
