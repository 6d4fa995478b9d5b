"""From request bodies to engine params: grammars, tools, logprobs, conflicts."""

from __future__ import annotations

import json

import pytest

from tokenspout.engine.request import SamplingParams
from tokenspout.errors import InvalidRequestError
from tokenspout.server import advanced_params
from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def params(**body: object) -> SamplingParams:
    request = ChatCompletionRequest.model_validate({"messages": MSG, **body})
    return advanced_params.apply(SamplingParams(), request)


def test_response_formats_become_grammars() -> None:
    assert params().grammar is None
    assert params(response_format={"type": "text"}).grammar is None
    assert params(response_format={"type": "json_object"}).grammar.kind == "json_object"  # type: ignore[union-attr]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    grammar = params(response_format=fmt).grammar
    assert grammar is not None and json.loads(grammar.source) == schema
    assert params(guided_choice=["a", "b"]).grammar.kind == "choice"  # type: ignore[union-attr]
    assert params(guided_json=json.dumps(schema)).grammar.kind == "json_schema"  # type: ignore[union-attr]


def test_tools_give_a_grammar_unless_none() -> None:
    assert params(tools=[TOOL]).tool_calls
    assert params(tools=[TOOL], tool_choice="none").grammar is None
    assert not params(tools=[TOOL], tool_choice="none").tool_calls
    with pytest.raises(InvalidRequestError) as err:  # text that could write a call's markup
        params(tools=[TOOL], guided_regex=".*")
    assert err.value.param == "guided_regex"


def test_tools_are_not_shown_to_the_model_under_tool_choice_none() -> None:
    # Shown them, the model wrote calls, which "none" could only send as text (markup).
    body = {"messages": MSG, "tools": [TOOL]}
    assert advanced_params.chat_tools(ChatCompletionRequest.model_validate(body))
    none = ChatCompletionRequest.model_validate({**body, "tool_choice": "none"})
    assert advanced_params.chat_tools(none) == []


def test_null_is_the_default_as_openai_sends_it() -> None:
    # The openai SDK sends null for a parameter given as None: 400 before for these.
    nulls = ("temperature", "top_p", "n", "logprobs", "presence_penalty", "frequency_penalty")
    body = ChatCompletionRequest.model_validate({"messages": MSG, **dict.fromkeys(nulls)})
    assert body == ChatCompletionRequest.model_validate({"messages": MSG})
    assert not body.model_fields_set - {"messages"}
    legacy = CompletionRequest.model_validate({"prompt": "p", "echo": None, "stream": None})
    assert legacy.echo is False and legacy.stream is False
    # A reply sent back as the SDK dumps it: its null fields are no fields.
    reply = {"role": "assistant", "content": "Hello", "refusal": None, "annotations": None,
             "audio": None, "function_call": None, "tool_calls": None}  # fmt: skip
    ChatCompletionRequest.model_validate({"messages": [*MSG, reply, *MSG]})
    with pytest.raises(ValueError, match="audio"):  # one with a value is not ignored
        ChatCompletionRequest.model_validate({"messages": [{**reply, "audio": {"id": "a"}}]})


def test_logprobs_fields() -> None:
    assert params(logprobs=True).logprobs == 0
    assert params(logprobs=True, top_logprobs=4).logprobs == 4
    assert params().logprobs is None
    completion = CompletionRequest.model_validate({"prompt": "x", "logprobs": 2})
    assert advanced_params.apply(SamplingParams(), completion).logprobs == 2


def test_text_only_transports_refuse_logprobs_and_tools() -> None:
    for p, name in ((params(logprobs=True), "logprobs"), (params(tools=[TOOL]), "tools")):
        with pytest.raises(InvalidRequestError) as err:
            advanced_params.check_text_only(p)
        assert err.value.param == name
    advanced_params.check_text_only(params(response_format={"type": "json_object"}))


def test_a_developer_message_is_a_system_message() -> None:
    # OpenAI's newer name for system: the engines and chat templates know only system.
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "developer", "content": "be brief"}, *MSG]}
    )
    roles = [m.role for m in advanced_params.chat_messages(body)]
    assert roles == ["system", "user"]


def test_text_parts_are_joined_a_line_apart() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": parts}]}
    )
    assert [m.content for m in advanced_params.chat_messages(request)] == ["first\nsecond"]


#: An assistant message as the openai SDK returns it, sent back (vLLM's reasoning fields).
RETURNED = {"role": "assistant", "content": "Paris.", "refusal": None, "annotations": [],
            "reasoning_content": "They ask for a capital.", "reasoning": "A capital."}  # fmt: skip


def chat(*messages: dict[str, object]) -> list[tuple[str, str]]:
    body = ChatCompletionRequest.model_validate({"messages": list(messages)})
    return [(m.role, m.content) for m in advanced_params.chat_messages(body)]


def test_an_assistant_message_sent_back_as_returned_renders_only_its_words() -> None:
    """Reasoning and annotations are no words of the conversation (vLLM's templates drop
    reasoning from the history); a refusal without content is what the assistant said."""
    plain = chat(*MSG, {"role": "assistant", "content": "Paris."}, *MSG)
    assert chat(*MSG, RETURNED, *MSG) == plain
    cited = {"type": "url_citation", "url_citation": {"url": "https://x", "title": "x"}}
    assert chat(*MSG, {**RETURNED, "annotations": [cited]}, *MSG) == plain
    refused = {"role": "assistant", "content": None, "refusal": "I can't."}
    assert chat(*MSG, refused, *MSG)[1] == ("assistant", "I can't.")
    # Empty content beside a refusal was rendered as the empty answer, the refusal dropped.
    for empty in ("", [], [{"type": "text", "text": ""}]):
        assert chat(*MSG, {**refused, "content": empty}, *MSG)[1] == ("assistant", "I can't.")
    assert chat(*MSG, {**refused, "content": "No."}, *MSG)[1] == ("assistant", "No.")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "refusal", "annotations"])
@pytest.mark.parametrize("role", ["user", "system", "developer"])
def test_only_an_assistant_message_carries_reasoning_refusal_annotations(
    field: str, role: str
) -> None:
    value: object = [] if field == "annotations" else "x"
    with pytest.raises(InvalidRequestError) as err:
        chat({"role": role, "content": "hi", field: value})
    assert err.value.param == f"messages[0].{field}"
    assert f"only assistant messages carry {field}" in err.value.message
