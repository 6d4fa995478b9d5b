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
    with pytest.raises(InvalidRequestError) as err:
        params(tools=[TOOL], response_format={"type": "json_object"})
    assert err.value.param == "tools"


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
