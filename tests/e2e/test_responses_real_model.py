"""``POST /v1/responses`` on the real model (SmolLM2-135M on the CPU) with the openai SDK's
own helpers: ``responses.stream``, ``responses.parse`` with a pydantic model, and a
function tool's round trip (its call, then its output in the next request's input). With a
135M model these assert structure, not cleverness."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.conftest import RunningServer, _start
from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.server.config import ServerConfig

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
GET_TIME = {
    "type": "function",
    "name": "get_time",
    "description": "The local time in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
    "strict": True,
}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def client() -> Iterator[OpenAI]:
    server: RunningServer
    server, stop = _start(LLMEngine(None, max_num_seqs=4), ServerConfig())
    yield OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
    stop()


def test_the_stream_helper_gives_the_whole_greedy_answer(client: OpenAI) -> None:
    asked = {"model": MODEL, "input": "What is the capital of France?", "temperature": 0}
    with client.responses.stream(**asked, max_output_tokens=64) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and "Paris" in final.output_text
    assert "".join(deltas) == final.output_text
    whole = client.responses.create(**asked, max_output_tokens=64)  # type: ignore[arg-type]
    assert whole.output_text == final.output_text
    assert whole.usage is not None and whole.usage.input_tokens > 0


def test_parse_with_a_pydantic_text_format(client: OpenAI) -> None:
    out = client.responses.parse(
        model=MODEL,
        input="Invent a person. Reply with their name and age.",
        text_format=Person,
        max_output_tokens=60,
        temperature=0,
    )
    assert out.status == "completed"
    assert isinstance(out.output_parsed, Person)
    assert json.loads(out.output_text) == out.output_parsed.model_dump()


def test_a_function_call_and_its_output_in_the_next_request(client: OpenAI) -> None:
    question = [{"role": "user", "content": "What time is it in Tokyo?"}]
    first = client.responses.create(
        model=MODEL,
        input=question,  # type: ignore[arg-type]
        tools=[GET_TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=60,
        temperature=0,
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_time"
    assert set(json.loads(call.arguments)) == {"city"}  # strict: no other key
    assert first.status == "completed"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "09:30"}
    second = client.responses.create(
        model=MODEL,
        input=[*question, call, result],  # type: ignore[list-item]
        tools=[GET_TIME],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=40,
        temperature=0,
    )
    (message,) = second.output
    assert message.type == "message" and second.output_text
