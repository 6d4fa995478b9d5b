"""The JSON messages of ``/v1/ws``. Pure: parse what a client sends, build what we send.

Client → server: ``{"type": "generate", "id": "<client id>", ...chat or completion fields}``
and ``{"type": "cancel", "id": "..."}``. Server → client: ``delta`` (``text``, and an
upstream's ``reasoning_content`` / ``refusal`` when it has some), ``done``, ``error``;
a stream's one ``done`` or ``error`` is its last message, and an ``error`` with ``id`` null
concerns no stream (a message that named none, or one refused without touching its stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenspout.engine.request import OutputExtras
from tokenspout.errors import InvalidRequestError, TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.json_limits import DEFAULT_MAX_DEPTH, check_value, parse
from tokenspout.protocols.openai_chunks import side_texts
from tokenspout.protocols.openai_errors import error_body

MAX_ID_LENGTH = 128


@dataclass(frozen=True)
class Generate:
    id: str
    #: The chat or completion request fields (everything but ``type`` and ``id``).
    body: dict[str, Any]

    @property
    def is_chat(self) -> bool:
        return "messages" in self.body


@dataclass(frozen=True)
class Cancel:
    id: str


ClientMessage = Generate | Cancel


class MessageRefused(InvalidRequestError):
    """A client message refused once its id could be read: the error names that stream
    (``msg_id``), and its ``param`` names the field at fault, as over HTTP."""

    def __init__(self, message: str, msg_id: str | None, *, param: str | None = None):
        super().__init__(message, param=param)
        self.msg_id = msg_id


def parse_client_message(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> ClientMessage:
    """Raises ``InvalidRequestError`` saying what is wrong: ``MessageRefused``, with the id,
    once one could be read."""
    data = parse(text, "message")
    if not isinstance(data, dict):
        raise InvalidRequestError("message must be a JSON object")
    kind = data.get("type")
    if kind not in ("generate", "cancel"):
        # The type first: a message of no known type is not asked for an id it need not have.
        try:
            read: str | None = _checked_id(data.get("id"))
        except InvalidRequestError:
            read = None
        raise MessageRefused(
            f"type must be 'generate' or 'cancel', not {kind!r}", read, param="type"
        )
    msg_id = _checked_id(data.get("id"))
    try:
        check_value(data, max_depth)
    except InvalidRequestError as err:
        raise MessageRefused(err.message, msg_id, param=err.param) from None
    if kind == "cancel":
        return Cancel(msg_id)
    # A null is a field not given, as in an HTTP body (``schemas.StrictBody``): before telling
    # a chat from a completion by which of messages and prompt it has.
    body = {k: v for k, v in data.items() if k not in ("type", "id") and v is not None}
    if ("messages" in body) == ("prompt" in body):
        raise MessageRefused(
            "generate needs exactly one of messages or prompt", msg_id, param="messages"
        )
    return Generate(msg_id, body)


def _checked_id(msg_id: object) -> str:
    """A message's id, or ``InvalidRequestError`` saying what is wrong with it."""
    if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_ID_LENGTH:
        raise InvalidRequestError(
            f"id must be a string of 1 to {MAX_ID_LENGTH} characters", param="id"
        )
    if not msg_id.isascii():
        try:
            msg_id.encode()
        except UnicodeEncodeError:
            # Checked before anything names it: every answer about it echoes the id, and a
            # frame with a lone surrogate cannot be sent (the socket dropped).
            raise InvalidRequestError(
                "id contains a lone surrogate (such as \\ud800)", param="id"
            ) from None
    return msg_id


def delta(stream_id: str, text: str, extras: Sequence[OutputExtras] = ()) -> dict[str, Any]:
    """A piece of the answer; with an upstream's reasoning or refusal among ``extras``, their
    pieces joined as ``reasoning_content`` / ``refusal`` (the chat delta's names)."""
    return {"type": "delta", "id": stream_id, "text": text, **side_texts(extras)}


def done(stream_id: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
    return {
        "type": "done",
        "id": stream_id,
        "finish_reason": finish_reason,
        "usage": usage.as_dict(),
    }


def error(stream_id: str | None, err: TokenspoutError) -> dict[str, Any]:
    """The OpenAI error object, as HTTP answers it (``param`` names the field at fault)."""
    return {"type": "error", "id": stream_id, **error_body(err)}
