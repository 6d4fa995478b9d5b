"""Parse: from an HTTP body (or a WebSocket message) to a validated request model. Every
failure is an ``InvalidRequestError`` (or a subclass) with a message that says what to fix."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import Request

from tokenspout.errors import InvalidRequestError, field_path
from tokenspout.protocols import json_limits
from tokenspout.server.request_body import read_body, require_json
from tokenspout.server.server_state import state_of

Body = TypeVar("Body", bound=BaseModel)


def describe(err: ValidationError, data: object) -> str:
    """pydantic's errors for the input ``data`` as one line a user can act on:
    ``field: problem; ...``."""
    parts = [f"{_where(e, data) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)]
    return "; ".join(parts)


def _where(error: ErrorDetails, data: object) -> str:
    """Where in ``data`` pydantic's ``error`` is, as ``param`` names it ("" for the body)."""
    return field_path(_path(error["loc"], data, missing=error["type"] == "missing"))


def _path(loc: tuple[int | str, ...], data: object, *, missing: bool) -> list[int | str]:
    """The fields of ``loc`` that are in ``data``, and the missing one at its end.

    pydantic puts the member of a union it tried into the location: a tagged union's tag
    (``response_format.json_schema.json_schema`` for ``response_format.json_schema``) or a
    member's type (``messages[0].content.str``). Those are no field of the input: following
    the location through ``data`` leaves them out."""
    path: list[int | str] = []
    for i, key in enumerate(loc):
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        elif not (missing and i == len(loc) - 1 and isinstance(data, dict)):
            continue  # a union member's name
        path.append(key)
    return path


async def parse_body(request: Request, model: type[Body], limit: int) -> Body:
    """A JSON body (as ``read_json`` reads it) validated as ``model``."""
    return validate(model, await read_json(request, limit))


async def read_json(request: Request, limit: int) -> object:
    """A JSON body (415 otherwise) of at most ``limit`` bytes (413), nested no deeper than
    ``--max-json-depth``, valid Unicode, decoded but not validated."""
    require_json(request)
    config = state_of(request).config
    raw = await read_body(request, limit, config.body_timeout_s)
    return json_limits.loads(raw, "request body", config.max_json_depth)


def validate(model: type[Body], data: object) -> Body:
    """Decoded JSON ``data`` as ``model``; ``InvalidRequestError`` naming the first field at
    fault (its ``param``: the whole path, ``messages[0].content``, as OpenAI names it) and
    every problem otherwise."""
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        param = _where(err.errors(include_url=False)[0], data) or None
        raise InvalidRequestError(describe(err, data), param=param) from None
