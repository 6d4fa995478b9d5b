"""The Responses API's events and response object (``responses_events``), each validated
by the openai SDK's own types (``openai.types.responses``): what its client parses."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tokenspout.engine.request import OutputExtras, ToolCallDelta
from tokenspout.errors import InternalError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_chunks import ChoiceOutput
from tokenspout.protocols.responses_events import ResponsesEvents

USAGE = Usage(prompt_tokens=7, completion_tokens=5)
SETTINGS = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": True, "store": False}
#: The SDK's event class of each event type.
EVENT_TYPES = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


def events() -> ResponsesEvents:
    return ResponsesEvents("resp_s1", "s1", 1700000000, "m", SETTINGS)


def checked(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``payloads``, each valid as the SDK's event of its type."""
    for payload in payloads:
        EVENT_TYPES[payload["type"]].model_validate(payload)
    return payloads


def call(index: int, first: bool, arguments: str) -> OutputExtras:
    piece = ToolCallDelta(index, "call_1" if first else None, "f" if first else None, arguments)
    return OutputExtras(tool_calls=(piece,))


def test_a_text_answer_opens_its_item_once_and_closes_it_whole() -> None:
    enc = events()
    stream = [
        *enc.opening(),
        *enc.delta_events("Hello", []),
        *enc.delta_events(", world", []),
        *enc.closing("stop", USAGE),
    ]
    checked(stream)
    assert [e["type"] for e in stream] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    assert stream[6]["text"] == "Hello, world"
    done = Response.model_validate(stream[-1]["response"])
    assert done.status == "completed" and done.output_text == "Hello, world"
    assert done.id == "resp_s1" and done.output[0].id == stream[2]["item"]["id"]
    assert done.usage is not None and (done.usage.input_tokens, done.usage.total_tokens) == (7, 12)


def test_a_call_is_a_function_call_item_with_its_arguments_in_pieces() -> None:
    enc = events()
    stream = checked(
        [
            *enc.opening(),
            *enc.delta_events("", [call(0, True, '{"a"')]),
            *enc.delta_events("", [call(0, False, ": 1}")]),
            *enc.closing("tool_calls", USAGE),
        ]
    )
    kinds = [e["type"] for e in stream[2:]]
    assert kinds == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = stream[2]["item"]
    assert (added["call_id"], added["name"], added["arguments"]) == ("call_1", "f", "")
    (item,) = Response.model_validate(stream[-1]["response"]).output
    assert item.type == "function_call" and item.arguments == '{"a": 1}'
    assert item.call_id == "call_1" and item.status == "completed"


def test_text_then_a_call_closes_the_message_first() -> None:
    enc = events()
    enc.opening()
    text = enc.delta_events("Let me look.", [])
    then = checked(enc.delta_events("", [call(0, True, "{}")]))
    assert [e["type"] for e in then] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
    ]
    assert then[3]["output_index"] == 1 and then[3]["item"]["id"] != text[0]["item"]["id"]


@pytest.mark.parametrize(
    ("finish", "status", "event", "reason"),
    [
        ("length", "incomplete", "response.incomplete", "max_output_tokens"),
        ("content_filter", "incomplete", "response.incomplete", "content_filter"),
        ("cancelled", "cancelled", "response.incomplete", None),
        ("stop", "completed", "response.completed", None),
    ],
)
def test_how_the_answer_finished_is_the_status(
    finish: str, status: str, event: str, reason: str | None
) -> None:
    enc = events()
    enc.opening()
    enc.delta_events("cut", [])
    *_, item_done, end = checked(enc.closing(finish, USAGE))
    assert end["type"] == event and end["response"]["status"] == status
    details = end["response"]["incomplete_details"]
    assert (details and details["reason"]) == reason
    assert item_done["item"]["status"] == ("completed" if status == "completed" else "incomplete")


def test_an_answer_without_output_is_an_empty_message() -> None:
    enc = events()
    enc.opening()
    stream = checked(enc.closing("stop", USAGE))
    assert stream[0]["type"] == "response.output_item.added"
    assert Response.model_validate(stream[-1]["response"]).output_text == ""


def test_an_error_is_an_error_event_in_sequence() -> None:
    enc = events()
    opening = enc.opening()
    (error,) = checked([enc.error(InternalError("boom"))])
    assert error["sequence_number"] == len(opening)
    assert (error["message"], error["code"]) == ("boom", "internal_error")


def test_the_whole_response_has_the_streams_shape() -> None:
    extras = [call(0, True, '{"a": 1}')]
    whole = events().response_choices([ChoiceOutput("", "tool_calls", extras)], USAGE)
    response = Response.model_validate(whole)
    (item,) = response.output
    assert item.type == "function_call" and item.name == "f"
    assert response.status == "completed" and response.store is False
    text = events().response_choices([ChoiceOutput("hi", "length")], USAGE)
    assert Response.model_validate(text).output_text == "hi"
    assert text["incomplete_details"] == {"reason": "max_output_tokens"}
