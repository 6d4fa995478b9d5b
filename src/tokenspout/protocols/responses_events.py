"""OpenAI's Responses API: a stream's life as its typed events, and the whole response.

A stream opens with ``response.created`` and ``response.in_progress``; its text goes into a
``message`` output item (``response.output_item.added``, ``response.content_part.added``,
then ``response.output_text.delta`` per event), a call into a ``function_call`` item
(``response.output_item.added`` with its name, then
``response.function_call_arguments.delta``); the end closes the open item (its ``.done``
events) and ends with ``response.completed``, or ``response.incomplete`` when
``max_output_tokens`` (or a content filter, or a cancel) cut the answer. Every event has a
``type`` (also its SSE event name) and a ``sequence_number``; there is no ``[DONE]``. A
failure after the start is an ``error`` event.

The shapes are those of the openai SDK's ``openai.types.responses`` (``Response``,
``ResponseStreamEvent``). One encoder serves one reader: it keeps the output so far, which
``response.completed`` carries whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenspout.engine.request import OutputExtras, ToolCallDelta
from tokenspout.engine.tool_calls import merge_calls
from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_chunks import ChoiceOutput

#: A finish reason that cut the answer short, and the ``incomplete_details.reason`` it gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass
class _Item:
    """One output item: a ``message`` (its text) or a ``function_call``."""

    type: str
    id: str
    text: str = ""
    call_id: str = ""
    name: str = ""
    arguments: str = ""

    def as_dict(self, status: str) -> dict[str, Any]:
        if self.type == "message":
            return {
                "type": "message",
                "id": self.id,
                "status": status,
                "role": "assistant",
                "content": [_text_part(self.text)] if status != "in_progress" else [],
            }
        return {
            "type": "function_call",
            "id": self.id,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments if status != "in_progress" else "",
            "status": status,
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_status(finish_reason: str) -> str:
    """A response's ``status`` for how its answer finished."""
    if finish_reason == "cancelled":
        return "cancelled"
    return "incomplete" if finish_reason in _INCOMPLETE else "completed"


@dataclass
class ResponsesEvents:
    """The ``ChunkFormat`` of ``/v1/responses``. Its events are typed (``typed_events``): a
    delta is ``delta_events``, several events when it opens an output item, each named by
    its type. ``settings``: what the response object echoes of the request."""

    #: ``resp_<stream id>``.
    id: str
    stream_id: str
    created: int
    model: str
    settings: Mapping[str, Any]
    ends_with_done = False
    typed_events = True
    _sequence: int = 0
    _items: list[_Item] = field(default_factory=list)
    #: Whether the last item is still open (receiving text or arguments).
    _open: bool = False

    # -- the stream --------------------------------------------------------------------

    def opening(self) -> list[dict[str, Any]]:
        snapshot = self._response("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def delta_events(self, text: str, extras: Sequence[OutputExtras] = ()) -> list[dict[str, Any]]:
        """The events of one delta: its text, then its tool-call pieces, each opening its
        output item first when it is the item's first."""
        events = self._text(text) if text else []
        for piece in (d for x in extras for d in x.tool_calls):
            events += self._call_piece(piece)
        return events

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        events = [] if self._items else self._open_message()
        status = "completed" if response_status(finish_reason) == "completed" else "incomplete"
        if self._open:
            events += self._close(status)
        output = [
            item.as_dict(status if i == len(self._items) - 1 else "completed")
            for i, item in enumerate(self._items)
        ]
        whole = self._response(response_status(finish_reason), output, finish_reason, usage)
        kind = "response.completed" if whole["status"] == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=whole)]

    def error(self, err: TokenspoutError) -> dict[str, Any]:
        return self._event("error", code=err.code, message=err.message, param=err.param)

    # -- the whole response -------------------------------------------------------------

    def response_choices(self, choices: Sequence[ChoiceOutput], usage: Usage) -> dict[str, Any]:
        """The whole ``response`` object (a Responses request has one choice)."""
        (choice,) = choices
        text, finish_reason, extras = choice
        status = "completed" if response_status(finish_reason) == "completed" else "incomplete"
        calls = merge_calls([d for x in extras for d in x.tool_calls])
        items = []
        if text or not calls:
            items.append(_Item("message", self._item_id("msg", 0), text=text))
        for call in calls:
            item_id = self._item_id("fc", len(items))
            items.append(_Item("function_call", item_id, "", call.id, call.name, call.arguments))
        output = [
            item.as_dict(status if i == len(items) - 1 else "completed")
            for i, item in enumerate(items)
        ]
        return self._response(response_status(finish_reason), output, finish_reason, usage)

    # -- events -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _item_id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.stream_id}_{index}"

    def _text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if not (self._open and self._items[-1].type == "message"):
            events = self._close("completed") + self._open_message()
        item = self._items[-1]
        item.text += text
        index = len(self._items) - 1
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item.id,
                output_index=index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        index = len(self._items)
        item = _Item("message", self._item_id("msg", index))
        self._items.append(item)
        self._open = True
        return [
            self._event(
                "response.output_item.added", output_index=index, item=item.as_dict("in_progress")
            ),
            self._event(
                "response.content_part.added",
                item_id=item.id,
                output_index=index,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def _call_piece(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        events = []
        if piece.id is not None or not (self._open and self._items[-1].type == "function_call"):
            events = self._close("completed")
            index = len(self._items)
            item = _Item(
                "function_call", self._item_id("fc", index), call_id=piece.id or "",
                name=piece.name or "",
            )  # fmt: skip
            self._items.append(item)
            self._open = True
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item=item.as_dict("in_progress"),
                )
            )
        item = self._items[-1]
        if piece.arguments:
            item.arguments += piece.arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=len(self._items) - 1,
                    delta=piece.arguments,
                )
            )
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        """The events that end the open item, if one is."""
        if not self._open:
            return []
        self._open = False
        item = self._items[-1]
        index = len(self._items) - 1
        if item.type == "message":
            where = {"item_id": item.id, "output_index": index, "content_index": 0}
            events = [
                self._event("response.output_text.done", **where, text=item.text, logprobs=[]),
                self._event("response.content_part.done", **where, part=_text_part(item.text)),
            ]
        else:
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            ]
        events.append(
            self._event("response.output_item.done", output_index=index, item=item.as_dict(status))
        )
        return events

    # -- the response object ------------------------------------------------------------

    def _response(
        self,
        status: str,
        output: list[dict[str, Any]],
        finish_reason: str | None = None,
        usage: Usage | None = None,
    ) -> dict[str, Any]:
        reason = _INCOMPLETE.get(finish_reason or "")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": reason} if reason else None,
            "model": self.model,
            "output": output,
            "usage": None if usage is None else _usage(usage),
            **self.settings,
        }


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # The prefix cache's reuse is not counted per request.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
