"""OpenAI's Responses API: a stream's life as its typed events, and the whole response.

A stream opens with ``response.created`` and ``response.in_progress``; its text goes into a
``message`` output item (``response.output_item.added``, ``response.content_part.added``,
then ``response.output_text.delta`` per event), a call into a ``function_call`` item
(``response.output_item.added`` with its name, then
``response.function_call_arguments.delta``, in the item of the call the piece names by its
``index``: an upstream may interleave parallel calls' pieces, so the calls since the last
other item stay open together). An upstream's reasoning goes into a ``reasoning`` item
before them (``response.output_item.added``, then ``response.reasoning_text.delta``), its
refusal into the message as a ``refusal`` part (``response.content_part.added``, then
``response.refusal.delta``): not dropped, which would leave a refusal an empty answer. A new
kind of output closes the open item (or part, or calls) first, so each item's
``output_index`` is its place in the output. The end closes the open items (their ``.done``
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
from typing import Any, NamedTuple

from tokenspout.engine.request import OutputExtras, ToolCallDelta
from tokenspout.engine.tool_calls import merge_calls
from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_chunks import ChoiceOutput

#: A response's id is this and its stream's id.
RESPONSE_ID_PREFIX = "resp_"
#: A finish reason that cut the answer short, and the ``incomplete_details.reason`` it gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class _Kind(NamedTuple):
    """How a kind of text is sent: the output item that holds it, its delta and done
    events, the field that names its text in a part and in the done event, and whether
    ``response.content_part.added`` / ``.done`` frame it (a message's parts, which may be
    several; a reasoning item has its one text, announced by the item itself)."""

    item: str
    delta: str
    done: str
    field: str
    framed: bool


_KINDS = {
    "reasoning_text": _Kind(
        "reasoning", "response.reasoning_text.delta", "response.reasoning_text.done", "text", False
    ),
    "output_text": _Kind(
        "message", "response.output_text.delta", "response.output_text.done", "text", True
    ),
    "refusal": _Kind("message", "response.refusal.delta", "response.refusal.done", "refusal", True),
}


#: The prefix of each item type's ids.
_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


@dataclass
class _Part:
    """A text of an item: a message's ``output_text`` or ``refusal`` part, or a reasoning
    item's ``reasoning_text``."""

    kind: str
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "output_text":
            return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
        return {"type": self.kind, _KINDS[self.kind].field: self.text}


@dataclass
class _Item:
    """One output item: a ``reasoning`` item or a ``message`` (their texts, ``parts``), or
    a ``function_call``."""

    type: str
    id: str
    parts: list[_Part] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    arguments: str = ""

    def as_dict(self, status: str) -> dict[str, Any]:
        content = [p.as_dict() for p in self.parts] if status != "in_progress" else []
        if self.type == "message":
            return {
                "type": "message",
                "id": self.id,
                "status": status,
                "role": "assistant",
                "content": content,
            }
        if self.type == "reasoning":
            return {
                "type": "reasoning",
                "id": self.id,
                "summary": [],
                "content": content,
                "status": status,
            }
        return {
            "type": "function_call",
            "id": self.id,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments if status != "in_progress" else "",
            "status": status,
        }


def response_status(finish_reason: str) -> str:
    """A response's ``status`` for how its answer finished."""
    if finish_reason == "cancelled":
        return "cancelled"
    return "incomplete" if finish_reason in _INCOMPLETE else "completed"


def _texts(text: str, extras: Sequence[OutputExtras]) -> list[tuple[str, str]]:
    """The texts of a delta (or of a whole answer), each kind joined, in the order they are
    sent: the reasoning, which precedes the answer; the answer's text; its refusal."""
    texts = [
        ("reasoning_text", "".join(x.reasoning for x in extras)),
        ("output_text", text),
        ("refusal", "".join(x.refusal for x in extras)),
    ]
    return [(kind, piece) for kind, piece in texts if piece]


@dataclass
class ResponsesEvents:
    """The ``ChunkFormat`` of ``/v1/responses``. Its events are typed (``typed_events``): a
    delta is ``delta_events``, several events when it opens an output item, each named by
    its type. ``settings``: what the response object echoes of the request."""

    #: ``resp_<stream id>`` (``RESPONSE_ID_PREFIX``).
    id: str
    stream_id: str
    created: int
    model: str
    settings: Mapping[str, Any]
    ends_with_done = False
    typed_events = True
    _sequence: int = 0
    _items: list[_Item] = field(default_factory=list)
    #: Where the open items begin, if any are: they are the last item (receiving text; its
    #: last part, if it has parts, is then open too), or the calls since the last other
    #: item (receiving arguments, each by its call's index: ``_calls``).
    _open_from: int | None = None
    #: The open calls' items (their places in ``_items``) by the calls' indexes.
    _calls: dict[int, int] = field(default_factory=dict)

    # -- the stream --------------------------------------------------------------------

    def opening(self) -> list[dict[str, Any]]:
        snapshot = self._response("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def delta_events(self, text: str, extras: Sequence[OutputExtras] = ()) -> list[dict[str, Any]]:
        """The events of one delta: an upstream's reasoning, the text, an upstream's
        refusal, then the tool-call pieces (``_texts``), each opening its output item (and
        part) first when it is the first of its kind there."""
        events = []
        for kind, piece in _texts(text, extras):
            events += self._piece(kind, piece)
        for call in (d for x in extras for d in x.tool_calls):
            events += self._call_piece(call)
        return events

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        events = [] if self._items else self._open_item("message") + self._open_part("output_text")
        status = "completed" if response_status(finish_reason) == "completed" else "incomplete"
        events += self._close(status)
        whole = self._response(
            response_status(finish_reason), _output(self._items, status), finish_reason, usage
        )
        kind = "response.completed" if whole["status"] == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=whole)]

    def error(self, err: TokenspoutError) -> dict[str, Any]:
        return self._event("error", code=err.code, message=err.message, param=err.param)

    # -- the whole response -------------------------------------------------------------

    def response_choices(self, choices: Sequence[ChoiceOutput], usage: Usage) -> dict[str, Any]:
        """The whole ``response`` object (a Responses request has one choice), with the
        items its stream would have had: the reasoning, the message (its text, then its
        refusal), the calls."""
        (choice,) = choices
        text, finish_reason, extras = choice
        status = "completed" if response_status(finish_reason) == "completed" else "incomplete"
        calls = merge_calls([d for x in extras for d in x.tool_calls])
        texts = _texts(text, extras)
        items = []
        if texts and texts[0][0] == "reasoning_text":
            items.append(_Item("reasoning", self._item_id("reasoning", 0), [_Part(*texts.pop(0))]))
        if texts or not (calls or items):
            parts = [_Part(kind, piece) for kind, piece in texts] or [_Part("output_text")]
            items.append(_Item("message", self._item_id("message", len(items)), parts))
        for call in calls:
            item_id = self._item_id("function_call", len(items))
            items.append(_Item("function_call", item_id, [], call.id, call.name, call.arguments))
        return self._response(
            response_status(finish_reason), _output(items, status), finish_reason, usage
        )

    # -- events -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _item_id(self, kind: str, index: int) -> str:
        """The id of the item of type ``kind`` at ``index`` in the output."""
        return f"{_PREFIX[kind]}_{self.stream_id}_{index}"

    def _where(self) -> dict[str, Any]:
        """Where the open part is: its item's id and index, and its index in the item."""
        item = self._items[-1]
        index = len(self._items) - 1
        return {"item_id": item.id, "output_index": index, "content_index": len(item.parts) - 1}

    def _piece(self, kind: str, text: str) -> list[dict[str, Any]]:
        """A piece of text of ``kind``: in the open item if it is of the kind's type (a new
        part when the open one is of another kind), else in a new item."""
        spec = _KINDS[kind]
        events = []
        if not (self._open_from is not None and self._items[-1].type == spec.item):
            events = self._close("completed") + self._open_item(spec.item)
        item = self._items[-1]
        if not item.parts or item.parts[-1].kind != kind:
            events += self._close_part() + self._open_part(kind)
        item.parts[-1].text += text
        logprobs = {"logprobs": []} if kind == "output_text" else {}
        events.append(self._event(spec.delta, **self._where(), delta=text, **logprobs))
        return events

    def _open_item(self, kind: str, **fields: str) -> list[dict[str, Any]]:
        index = len(self._items)
        item = _Item(kind, self._item_id(kind, index), **fields)
        self._items.append(item)
        if self._open_from is None:
            self._open_from = index
        return [
            self._event(
                "response.output_item.added", output_index=index, item=item.as_dict("in_progress")
            )
        ]

    def _open_part(self, kind: str) -> list[dict[str, Any]]:
        self._items[-1].parts.append(_Part(kind))
        if not _KINDS[kind].framed:
            return []
        part = _Part(kind).as_dict()
        return [self._event("response.content_part.added", **self._where(), part=part)]

    def _close_part(self) -> list[dict[str, Any]]:
        """The events that end the open item's last part, if it has one."""
        item = self._items[-1]
        if not item.parts:
            return []
        part = item.parts[-1]
        spec = _KINDS[part.kind]
        where = self._where()
        logprobs = {"logprobs": []} if part.kind == "output_text" else {}
        events = [self._event(spec.done, **where, **{spec.field: part.text}, **logprobs)]
        if spec.framed:
            events.append(self._event("response.content_part.done", **where, part=part.as_dict()))
        return events

    def _call_piece(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        """A piece of the call ``piece.index``: in that call's item, which a piece with an
        id (a call's first) opens; the open item closes first unless it is a call."""
        events = []
        index = self._calls.get(piece.index)
        if piece.id is not None or index is None:
            # A call's first piece has its id and name, which its item says from the start.
            call = {"call_id": piece.id or "", "name": piece.name or ""}
            events = [] if self._calls else self._close("completed")
            events += self._open_item("function_call", **call)
            index = self._calls[piece.index] = len(self._items) - 1
        item = self._items[index]
        if piece.arguments:
            item.arguments += piece.arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=index,
                    delta=piece.arguments,
                )
            )
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        """The events that end the open items, if any are, in order; the last item gets
        ``status``, the others were whole (as in ``_output``)."""
        if self._open_from is None:
            return []
        events = []
        last = len(self._items) - 1
        for index in range(self._open_from, last + 1):
            item = self._items[index]
            if item.type == "function_call":
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item.id,
                        output_index=index,
                        name=item.name,
                        arguments=item.arguments,
                    )
                )
            else:
                events += self._close_part()
            done = item.as_dict(status if index == last else "completed")
            events.append(self._event("response.output_item.done", output_index=index, item=done))
        self._open_from = None
        self._calls.clear()
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


def _output(items: list[_Item], status: str) -> list[dict[str, Any]]:
    """The items as a response's ``output``: the last one has the answer's ``status`` (it
    was open when the answer ended), the others are complete."""
    return [
        item.as_dict(status if i == len(items) - 1 else "completed") for i, item in enumerate(items)
    ]


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # The prefix cache's reuse is not counted per request.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        # Not known: an upstream's chunks do not say which of their tokens were reasoning
        # (vLLM's chat usage has no ``completion_tokens_details``), and those counted here
        # are outputs, which a coalescing upstream does not give one per token.
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
