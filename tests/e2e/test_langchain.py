"""LangChain's OpenAI chat model, unchanged, against the real model: structured output and
tool binding are what agent frameworks build on."""

from __future__ import annotations

from collections.abc import Iterator

import jsonschema
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.conftest import RunningServer, _start
from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.server.config import ServerConfig

MODEL = "SmolLM2-135M-Instruct"


class Person(BaseModel):
    name: str
    age: int


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running, stop = _start(LLMEngine(None, max_num_seqs=2), ServerConfig())
    yield running
    stop()


def chat_model(server: RunningServer, **kw: object) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key="x",  # type: ignore[arg-type]
        temperature=0,
        max_retries=0,
        **kw,  # type: ignore[arg-type]
    )


def test_with_structured_output_returns_the_pydantic_object(server: RunningServer) -> None:
    model = chat_model(server, max_tokens=40).with_structured_output(Person)
    person = model.invoke("Invent a person. Reply with their name and age.")
    assert isinstance(person, Person)


def test_bind_tools_with_a_required_call_streams_a_valid_call(server: RunningServer) -> None:
    model = chat_model(server, max_tokens=40, streaming=True).bind_tools(
        [get_weather], tool_choice="get_weather"
    )
    chunks = list(model.stream("What is the weather in Paris?"))
    assert len(chunks) > 2
    message = chunks[0]
    for chunk in chunks[1:]:
        message += chunk  # type: ignore[assignment]
    (call,) = message.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather"
    schema = get_weather.args_schema.model_json_schema()  # type: ignore[union-attr]
    jsonschema.validate(call["args"], schema)
