"""The ``/v1/ws`` messages: what a client may send (and the error for what it may not), and
the shapes of what the server sends."""

from __future__ import annotations

import json

import pytest

from tokenspout.engine.request import OutputExtras, TokenLogprob
from tokenspout.errors import EngineError, InvalidRequestError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.websocket_messages import (
    MAX_ID_LENGTH,
    Cancel,
    Generate,
    MessageRefused,
    delta,
    done,
    error,
    parse_client_message,
)


def test_generate_with_a_prompt() -> None:
    message = parse_client_message(
        json.dumps({"type": "generate", "id": "r1", "prompt": "Hi", "max_tokens": 4})
    )
    assert message == Generate("r1", {"prompt": "Hi", "max_tokens": 4})
    assert isinstance(message, Generate) and not message.is_chat


def test_generate_with_messages_is_a_chat() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    message = parse_client_message(
        json.dumps({"id": "c", "type": "generate", "messages": messages, "stream": True})
    )
    assert message == Generate("c", {"messages": messages, "stream": True})
    assert isinstance(message, Generate) and message.is_chat


def test_a_null_is_a_field_not_given() -> None:
    # As over HTTP (what the openai SDK sends for a parameter passed as None): a null
    # messages beside a prompt made the generate "need exactly one of messages or prompt".
    messages = [{"role": "user", "content": "Hi"}]
    sent = {"type": "generate", "id": "n", "prompt": "hello", "messages": None, "seed": None}
    message = parse_client_message(json.dumps(sent))
    assert message == Generate("n", {"prompt": "hello"})
    assert isinstance(message, Generate) and not message.is_chat
    sent = {"type": "generate", "id": "n", "prompt": None, "messages": messages}
    message = parse_client_message(json.dumps(sent))
    assert isinstance(message, Generate) and message.is_chat
    with pytest.raises(InvalidRequestError, match="exactly one of messages or prompt"):
        parse_client_message('{"type": "generate", "id": "n", "prompt": null, "messages": null}')


def test_cancel() -> None:
    assert parse_client_message('{"type": "cancel", "id": "r1"}') == Cancel("r1")


def test_ids_of_up_to_the_limit_are_taken() -> None:
    long_id = "x" * MAX_ID_LENGTH
    assert parse_client_message(json.dumps({"type": "cancel", "id": long_id})) == Cancel(long_id)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('["generate"]', "must be a JSON object"),
        ('"generate"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        ('{"type": "generate", "prompt": "x"}', "id must be a string"),
        ('{"type": "generate", "id": 7, "prompt": "x"}', "id must be a string"),
        ('{"type": "generate", "id": "", "prompt": "x"}', "id must be a string"),
        (json.dumps({"type": "cancel", "id": "x" * (MAX_ID_LENGTH + 1)}), "1 to 128"),
        ('{"type": "cancel", "id": "a\\ud800"}', "lone surrogate"),  # echoed, it cannot be sent
        ('{"type": "generate", "id": "\\udfff", "prompt": "x"}', "lone surrogate"),
        # A message of no known type is told so, with or without a readable id.
        ('{"type": "bogus"}', "type must be 'generate' or 'cancel', not 'bogus'"),
        ('{"id": 7}', "type must be 'generate' or 'cancel', not None"),
        ('{"type": "stop", "id": "a\\ud800"}', "not 'stop'"),
    ],
)
def test_unreadable_messages_are_refused_without_an_id(text: str, says: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_client_message(text)
    assert says in refused.value.message
    assert getattr(refused.value, "msg_id", None) is None and refused.value.status_code == 400


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"type": "generate", "id": "r9"}, "exactly one of messages or prompt"),
        (
            {"type": "generate", "id": "r9", "prompt": "a", "messages": []},
            "exactly one of messages or prompt",
        ),
        ({"type": "stop", "id": "r9"}, "'stop'"),
        ({"id": "r9", "prompt": "a"}, "type must be 'generate' or 'cancel'"),
    ],
)
def test_wrong_messages_with_an_id_name_it(message: dict, says: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_client_message(json.dumps(message))
    assert says in refused.value.message
    assert isinstance(refused.value, MessageRefused) and refused.value.msg_id == "r9"
    # The field at fault, not the id.
    assert refused.value.param in ("messages", "type")


def test_what_the_server_sends() -> None:
    assert delta("r1", "Hel") == {"type": "delta", "id": "r1", "text": "Hel"}
    assert done("r1", "stop", Usage(3, 4)) == {
        "type": "done",
        "id": "r1",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    assert error("r1", EngineError("the engine broke")) == {
        "type": "error",
        "id": "r1",
        "error": {
            "message": "the engine broke",
            "type": "server_error",
            "param": None,
            "code": "engine_error",
        },
    }
    # An error about a message whose id could not be read names no stream.
    refused = InvalidRequestError("message must be a JSON object")
    assert error(None, refused) == {
        "type": "error",
        "id": None,
        "error": {
            "message": "message must be a JSON object",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_request",
        },
    }
    # As over HTTP, the field at fault is named.
    bad_field = InvalidRequestError("max_tokens: Input should be an integer", param="max_tokens")
    assert error("a", bad_field)["error"]["param"] == "max_tokens"
    for message in (delta("r", "é\n"), done("r", "length", Usage(0, 1)), error(None, refused)):
        assert json.loads(json.dumps(message)) == message


def test_a_delta_carries_an_upstreams_reasoning_and_refusal_joined() -> None:
    extras = [OutputExtras(reasoning="Let"), OutputExtras(reasoning=" me"), OutputExtras()]
    assert delta("r1", "", extras) == {
        "type": "delta",
        "id": "r1",
        "text": "",
        "reasoning_content": "Let me",
    }
    assert delta("r1", "", [OutputExtras(refusal="No.")])["refusal"] == "No."
    assert delta("r1", "Hi", [OutputExtras(TokenLogprob("Hi", b"Hi", -0.1, ()))]) == delta(
        "r1", "Hi"
    )
