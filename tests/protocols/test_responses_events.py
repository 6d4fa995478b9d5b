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


def reasoning(text: str) -> OutputExtras:
    return OutputExtras(reasoning=text)


def refusal(text: str) -> OutputExtras:
    return OutputExtras(refusal=text)


def test_an_upstreams_reasoning_is_a_reasoning_item_before_the_message() -> None:
    enc = events()
    stream = checked(
        [
            *enc.opening(),
            *enc.delta_events("", [reasoning("Let "), reasoning("me ")]),
            # A coalesced event: the end of the reasoning, then the answer's first text.
            *enc.delta_events("Hi", [reasoning("think.")]),
            *enc.delta_events(" there", []),
            *enc.closing("stop", USAGE),
        ]
    )
    assert [(e["type"], e.get("output_index")) for e in stream[2:]] == [
        ("response.output_item.added", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", 1),
        ("response.completed", None),
    ]
    added = stream[2]["item"]
    assert (added["type"], added["summary"], added["content"]) == ("reasoning", [], [])
    assert [e["delta"] for e in stream[3:5]] == ["Let me ", "think."]
    assert stream[5]["text"] == "Let me think." and stream[5]["content_index"] == 0
    done = Response.model_validate(stream[-1]["response"])
    thought, message = done.output
    assert thought.type == "reasoning" and thought.id == added["id"] == stream[3]["item_id"]
    assert thought.content is not None and thought.content[0].text == "Let me think."
    assert thought.status == "completed"
    assert message.type == "message" and done.output_text == "Hi there"
    # Each item is done as the response has it.
    assert [stream[6]["item"], stream[13]["item"]] == stream[-1]["response"]["output"]
    # The whole response has the same items.
    whole = events().response_choices(
        [ChoiceOutput("Hi there", "stop", [reasoning("Let me "), reasoning("think.")])], USAGE
    )
    assert whole["output"] == stream[-1]["response"]["output"]


def test_a_refusal_is_the_messages_refusal_part_not_an_empty_answer() -> None:
    enc = events()
    stream = checked(
        [
            *enc.opening(),
            *enc.delta_events("", [refusal("I can't ")]),
            *enc.delta_events("", [refusal("help.")]),
            *enc.closing("stop", USAGE),
        ]
    )
    assert [e["type"] for e in stream[2:]] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert stream[3]["part"] == {"type": "refusal", "refusal": ""}
    assert stream[6]["refusal"] == "I can't help."
    assert stream[7]["part"] == {"type": "refusal", "refusal": "I can't help."}
    (message,) = Response.model_validate(stream[-1]["response"]).output
    assert message.type == "message"
    assert [(p.type, getattr(p, "refusal", None)) for p in message.content] == [
        ("refusal", "I can't help.")
    ]
    whole = events().response_choices([ChoiceOutput("", "stop", [refusal("I can't help.")])], USAGE)
    assert whole["output"] == stream[-1]["response"]["output"]


def test_text_then_a_refusal_are_two_parts_of_one_message() -> None:
    enc = events()
    enc.opening()
    enc.delta_events("Well.", [])
    then = checked(enc.delta_events("", [refusal("No.")]))
    assert [(e["type"], e["content_index"]) for e in then] == [
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.content_part.added", 1),
        ("response.refusal.delta", 1),
    ]
    *_, end = checked(enc.closing("stop", USAGE))
    (message,) = end["response"]["output"]
    assert [p["type"] for p in message["content"]] == ["output_text", "refusal"]
    whole = events().response_choices([ChoiceOutput("Well.", "stop", [refusal("No.")])], USAGE)
    assert whole["output"] == end["response"]["output"]


def test_reasoning_then_a_call_puts_the_call_at_output_index_1() -> None:
    enc = events()
    enc.opening()
    checked(enc.delta_events("", [reasoning("Weather tool.")]))
    then = checked(enc.delta_events("", [call(0, True, "{}")]))
    assert [(e["type"], e["output_index"]) for e in then] == [
        ("response.reasoning_text.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
    ]
    assert then[2]["item"]["id"].startswith("fc_") and then[2]["item"]["name"] == "f"
    *_, end = checked(enc.closing("tool_calls", USAGE))
    assert [i["type"] for i in end["response"]["output"]] == ["reasoning", "function_call"]
    extras = [reasoning("Weather tool."), call(0, True, "{}")]
    whole = events().response_choices([ChoiceOutput("", "tool_calls", extras)], USAGE)
    assert whole["output"] == end["response"]["output"]


def test_an_answer_cut_in_its_reasoning_has_an_incomplete_reasoning_item() -> None:
    enc = events()
    enc.opening()
    enc.delta_events("", [reasoning("Let me")])
    *_, item_done, end = checked(enc.closing("length", USAGE))
    assert item_done["item"]["status"] == "incomplete"
    (thought,) = Response.model_validate(end["response"]).output
    assert thought.type == "reasoning" and thought.status == "incomplete"
    whole = events().response_choices([ChoiceOutput("", "length", [reasoning("Let me")])], USAGE)
    assert whole["output"] == end["response"]["output"]


def test_interleaved_calls_each_stream_into_their_own_item() -> None:
    """Parallel calls' pieces that interleave by index (an upstream's): each goes to its
    call's item, which stays open until the calls end; each item's ``.done`` events carry
    its own arguments, and the whole response is the same."""
    enc = events()
    enc.opening()
    first = ToolCallDelta(0, "call_1", "f", "")
    second = ToolCallDelta(1, "call_2", "g", "")
    pieces = [first, second, ToolCallDelta(0, None, None, '{"a": 1}')]
    pieces.append(ToolCallDelta(1, None, None, '{"b": 2}'))
    stream = [
        e for p in pieces for e in checked(enc.delta_events("", [OutputExtras(tool_calls=(p,))]))
    ]
    stream += checked(enc.closing("tool_calls", USAGE))
    assert [e["sequence_number"] for e in stream] == list(range(2, 2 + len(stream)))
    deltas = [(e["output_index"], e["item_id"], e["delta"]) for e in stream
              if e["type"] == "response.function_call_arguments.delta"]  # fmt: skip
    assert deltas == [(0, "fc_s1_0", '{"a": 1}'), (1, "fc_s1_1", '{"b": 2}')]
    done = [(e["type"], e["output_index"], e.get("arguments") or e.get("item", {}).get("arguments"))
            for e in stream if e["type"].endswith(".done")]  # fmt: skip
    assert done == [
        ("response.function_call_arguments.done", 0, '{"a": 1}'),
        ("response.output_item.done", 0, '{"a": 1}'),
        ("response.function_call_arguments.done", 1, '{"b": 2}'),
        ("response.output_item.done", 1, '{"b": 2}'),
    ]
    end = Response.model_validate(stream[-1]["response"])
    assert [(c.call_id, c.name, c.arguments) for c in end.output] == [  # type: ignore[union-attr]
        ("call_1", "f", '{"a": 1}'),
        ("call_2", "g", '{"b": 2}'),
    ]
    extras = [OutputExtras(tool_calls=(p,)) for p in pieces]
    whole = events().response_choices([ChoiceOutput("", "tool_calls", extras)], USAGE)
    assert whole["output"] == stream[-1]["response"]["output"]
