"""A prepared request's own small rules."""

from __future__ import annotations

from tokenspout.engine.request import ChatMessage, Prompt, SamplingParams
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.server.generation_request import GenerationRequest


def request(prompt: Prompt) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(), StreamWire("chat", "m"), False)


def test_the_logged_prompt_is_the_text_or_else_the_messages() -> None:
    rendered = request(Prompt("<|user|>hi", messages=(ChatMessage("user", "hi"),)))
    assert rendered.prompt_to_log(True) == "<|user|>hi"
    assert rendered.prompt_to_log(False) is None
    # An upstream renders the chat itself: the log shows what the client sent.
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "hi"))
    assert request(Prompt("", messages=chat)).prompt_to_log(True) == "system: Be brief.\nuser: hi"
