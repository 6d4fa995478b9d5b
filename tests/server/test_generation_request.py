"""A prepared request's own small rules."""

from __future__ import annotations

import threading

from tokenspout.engine.request import ChatMessage, Prompt, SamplingParams
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.server.config import ServerConfig
from tokenspout.server.generation_request import (
    OFF_LOOP_CHARS,
    GenerationRequest,
    prepare_chat,
    prepare_completion,
)
from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest
from tokenspout.server.server_state import ServerState


def request(prompt: Prompt) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(), StreamWire("chat", "m"), False)


def test_the_logged_prompt_is_the_text_or_else_the_messages() -> None:
    rendered = request(Prompt("<|user|>hi", messages=(ChatMessage("user", "hi"),)))
    assert rendered.prompt_to_log(True) == "<|user|>hi"
    assert rendered.prompt_to_log(False) is None
    # An upstream renders the chat itself: the log shows what the client sent.
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "hi"))
    assert request(Prompt("", messages=chat)).prompt_to_log(True) == "system: Be brief.\nuser: hi"


async def test_a_long_prompt_is_tokenized_off_the_event_loop() -> None:
    # Tokenizing 100,000 characters held the loop, and every stream's next event, ~50 ms.
    state = ServerState(SyntheticEngine(), ServerConfig())
    engine = state.engine
    encoded_on: list[int] = []

    def watched(encode):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            encoded_on.append(threading.get_ident())
            return encode(*args, **kwargs)

        return wrapper

    engine.encode_completion = watched(engine.encode_completion)  # type: ignore[method-assign]
    engine.encode_chat = watched(engine.encode_chat)  # type: ignore[method-assign]
    long = "x" * OFF_LOOP_CHARS
    for text in ("short", long):
        await prepare_completion(state, CompletionRequest(prompt=text, max_tokens=1))
        chat = [{"role": "user", "content": text}]
        await prepare_chat(state, ChatCompletionRequest(messages=chat, max_tokens=1))
    loop = threading.get_ident()
    assert [on == loop for on in encoded_on] == [True, True, False, False]
