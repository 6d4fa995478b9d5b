"""A Responses API body as the chat completion it asks for (``responses_chat``), and the
body's own refusals (``responses_schema``): pure conversions, table-tested."""

from __future__ import annotations

from typing import Any

import pytest

from tokenspout.errors import InvalidRequestError, PromptTooLongError
from tokenspout.server.request_parsing import validate
from tokenspout.server.responses_chat import as_chat, responses_params, settings
from tokenspout.server.responses_schema import ResponsesRequest

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def chat_of(body: dict[str, Any]) -> dict[str, Any]:
    """The chat body, as the fields it set (what an upstream is sent)."""
    chat = as_chat(validate(ResponsesRequest, body))
    return chat.model_dump(mode="json", by_alias=True, exclude_unset=True)


def test_a_string_input_is_a_user_message_after_the_instructions() -> None:
    assert chat_of({"input": "hi", "instructions": "be brief", "model": "m"}) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "stream": False,
    }


def test_items_become_messages_calls_and_tool_results() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'}
    sent_back = {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
    }
    parts = [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]
    body = {
        "input": [
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": parts},
            sent_back,
            call,
            {**call, "call_id": "c2"},
            {"type": "function_call_output", "call_id": "c1", "output": "1"},
            {"type": "function_call_output", "call_id": "c2", "output": "2"},
        ]
    }
    calls = [
        {"id": c, "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        for c in ("c1", "c2")
    ]
    assert chat_of(body)["messages"] == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
    ]


def test_a_call_without_text_before_it_is_an_assistant_message_of_its_own() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    (_, message) = chat_of({"input": [{"role": "user", "content": "q"}, call]})["messages"]
    assert message["role"] == "assistant" and "content" not in message  # null: unset
    assert [c["id"] for c in message["tool_calls"]] == ["c1"]


def test_a_call_output_that_answers_no_call_names_its_item() -> None:
    body = {
        "input": [
            {"role": "user", "content": "q"},
            {"type": "function_call_output", "call_id": "nope", "output": "1"},
        ]
    }
    with pytest.raises(InvalidRequestError) as caught:
        chat_of(body)
    assert caught.value.param == "input[1].call_id"


#: An earlier answer's reasoning item, as the openai SDK returns it (sent back).
THOUGHT = {"type": "reasoning", "id": "rs_1", "summary": [], "status": "completed",
           "content": [{"type": "reasoning_text", "text": "They ask for a call."}],
           "encrypted_content": None}  # fmt: skip


def test_a_reasoning_item_is_its_answers_reasoning_content() -> None:
    """Chat's field, which the embedded engine does not render and an upstream is sent:
    on the message that follows it, or on the call it led to."""
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    said = {"role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]}
    body = {
        "input": [
            {"role": "user", "content": "q"},
            THOUGHT,
            said,
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "1"},
            {**THOUGHT, "content": [{"type": "reasoning_text", "text": "Done."}]},
            {**THOUGHT, "content": None},  # a summary alone: no text of its own
            {"role": "assistant", "content": "It is 1."},
        ]
    }
    (_, answer, _, last) = chat_of(body)["messages"]
    assert answer["reasoning_content"] == "They ask for a call."
    assert answer["content"] == "Looking." and answer["tool_calls"][0]["id"] == "c1"
    assert last == {"role": "assistant", "content": "It is 1.", "reasoning_content": "Done."}
    (_, call_only) = chat_of({"input": [{"role": "user", "content": "q"}, THOUGHT, call]})[
        "messages"
    ]
    assert call_only["reasoning_content"] == "They ask for a call." and "content" not in call_only


@pytest.mark.parametrize(
    "after", [[], [{"role": "user", "content": "q"}]], ids=["at_the_end", "before_a_user"]
)
def test_a_reasoning_item_without_what_it_led_to_names_it(after: list[dict[str, Any]]) -> None:
    body = {"input": [{"role": "user", "content": "q"}, THOUGHT, *after]}
    with pytest.raises(InvalidRequestError, match="must be followed by") as caught:
        chat_of(body)
    assert caught.value.param == "input[1]"


def test_an_encrypted_reasoning_item_is_a_400_naming_it() -> None:
    body = {
        "input": [THOUGHT | {"encrypted_content": "gAAA"}, {"role": "assistant", "content": "a"}]
    }
    with pytest.raises(
        InvalidRequestError, match=r"input\[0\]\.encrypted_content: .*encrypts no"
    ) as caught:
        chat_of(body)
    assert caught.value.param == "input"


def test_a_refusal_part_sent_back_is_chats_refusal() -> None:
    refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}
    (_, message, _) = chat_of(
        {"input": [{"role": "user", "content": "q"}, refused, {"role": "user", "content": "ok"}]}
    )["messages"]
    assert message == {"role": "assistant", "refusal": "I can't."}  # content null: unset


def test_tools_choice_and_format_take_chat_shapes() -> None:
    body = {
        "input": "q",
        "tools": [WEATHER, {**WEATHER, "name": "loose", "strict": False}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "P", "schema": {"type": "object"}}},
        "max_output_tokens": 9,
        "temperature": 0,
        "parallel_tool_calls": False,
        "user": "u",
    }
    chat = chat_of(body)
    assert chat["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": WEATHER["parameters"],
            "strict": True,  # the Responses API's default
        },
    }
    assert chat["tools"][1]["function"]["strict"] is False
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "P", "schema": {"type": "object"}},
    }
    assert chat["max_completion_tokens"] == 9
    assert (chat["temperature"], chat["parallel_tool_calls"], chat["user"]) == (0, False, "u")


def test_fields_chat_accepts_as_no_ops_go_to_chat_as_given() -> None:
    """They were a 400 (unknown fields), though chat accepts them and the SDK sends them."""
    asked = {"prompt_cache_key": "k", "safety_identifier": "u", "service_tier": "auto"}
    chat = chat_of({"input": "q", **asked, "stream": True, "stream_options": {"flush_ms": 5}})
    assert {name: chat[name] for name in asked} == asked
    assert chat["stream_options"] == {"flush_ms": 5}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream_options.include_usage", {"include_usage": True}),
        ("stream_options.resumable", {"resumable": True}),
        ("previous_response_id", "resp_1"),
        ("conversation", "conv_1"),
        ("store", True),
        ("background", True),
        ("include", ["message.output_text.logprobs"]),
        ("reasoning", {"effort": "low"}),
        ("metadata", {str(i): "v" for i in range(17)}),
        ("metadata.k", {"k": 1}),
        ("metadata." + "k" * 65, {"k" * 65: "v"}),
        ("prompt", {"id": "p"}),
        ("truncation", "auto"),
        ("tools", [{"type": "web_search"}]),
        ("top_logprobs", 2),
        ("input", [{"type": "item_reference", "id": "rs_1"}]),
    ],
)
def test_what_is_not_served_is_a_400_naming_it(field: str, value: Any) -> None:
    """``field``: the param, the whole path to what is wrong."""
    with pytest.raises(InvalidRequestError) as caught:
        validate(ResponsesRequest, {"input": "q", field.split(".")[0]: value})
    assert caught.value.param == field


IMAGE = {"type": "input_image", "image_url": "https://example.com/a.png"}
CALL = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}


@pytest.mark.parametrize(
    ("value", "param", "what"),
    [
        (
            [{"role": "user", "content": [{"type": "input_text", "text": "q"}, IMAGE]}],
            "input[0].content[1]",
            'content parts of type "input_image" are not supported',
        ),
        (
            [{"type": "message", "role": "user", "content": [{"type": "input_file"}]}],
            "input[0].content[0]",
            'content parts of type "input_file" are not supported',
        ),
        (
            [CALL, {"type": "function_call_output", "call_id": "c", "output": [IMAGE]}],
            "input[1].output",
            "a function_call_output's output can only be a string",
        ),
    ],
)
def test_input_it_cannot_carry_is_one_message_naming_the_place(
    value: list[Any], param: str, what: str
) -> None:
    """These were pydantic's mismatch with each member of input's unions, param "input"."""
    with pytest.raises(InvalidRequestError) as caught:
        validate(ResponsesRequest, {"input": value})
    assert caught.value.param == param
    assert caught.value.message.startswith(f"{param}: {what}")
    assert "valid string" not in caught.value.message


@pytest.mark.parametrize(
    "served", [{"store": False}, {"include": []}, {"truncation": "disabled"}, {"reasoning": None}]
)
def test_the_one_served_value_of_a_field_is_accepted(served: dict[str, Any]) -> None:
    validate(ResponsesRequest, {"input": "q", **served})


def test_settings_echo_the_request_with_defaults() -> None:
    echoed = settings(validate(ResponsesRequest, {"input": "q", "tools": [WEATHER]}))
    assert echoed["tools"][0]["strict"] is True and echoed["tool_choice"] == "auto"
    assert echoed["text"] == {"format": {"type": "text"}}
    assert (echoed["store"], echoed["parallel_tool_calls"], echoed["truncation"]) == (
        False,
        True,
        "disabled",
    )


@pytest.mark.parametrize(
    ("chat_param", "responses_param"),
    [
        ("messages", "input"),
        ("messages[3].content", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("tool_choice", "tool_choice"),
    ],
)
def test_errors_of_the_chat_validation_name_the_responses_field(
    chat_param: str, responses_param: str
) -> None:
    with pytest.raises(PromptTooLongError) as caught, responses_params():
        raise PromptTooLongError("too long", param=chat_param)
    assert caught.value.param == responses_param


def test_an_error_message_names_the_responses_field_too() -> None:
    with pytest.raises(InvalidRequestError) as caught, responses_params():
        raise InvalidRequestError("response_format is not served", param="response_format")
    assert caught.value.message == "text.format is not served"
