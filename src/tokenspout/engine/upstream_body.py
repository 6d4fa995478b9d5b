"""The JSON an upstream is sent for a prompt and its params.

The client's own fields go through as it sent them (``SamplingParams.extra_body``: sampling
fields, vendor extensions, tools), and so do its messages (``ChatMessage.sent``: content
parts of any type, fields tokenspout does not read); tokenspout sets what it owns: the
model, the messages or prompt (a continuation's), the token limit (less what a first part
generated; left out when the client left it out: the upstream knows the context's room,
tokenspout, which cannot count the prompt's tokens, does not) and always ``stream: true``
with ``stream_options.include_usage``, whatever the client asked, since tokenspout makes
the client's stream itself.

The token limit goes under the name the client gave it: a chat's ``max_completion_tokens``
stays that (OpenAI's reasoning models refuse ``max_tokens`` with a 400), and so does the
one a Responses request becomes (its ``max_output_tokens``); ``max_tokens`` otherwise.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from tokenspout.engine.request import ChatMessage, Prompt, SamplingParams

#: How an upstream's chunks say the tokens generated so far (``upstream_server.token_counts``):
#: "tokenspout" is "usage" from a server that also takes its own coalescing settings.
TokenCounts = Literal["usage", "timings", "tokenspout"]


def request_body(
    prompt: Prompt, params: SamplingParams, counts: TokenCounts | None = None
) -> tuple[str, dict[str, Any]]:
    """The path under the upstream's base (``/chat/completions`` or ``/completions``) and
    the body to post there; ``counts`` asks for each chunk's count of tokens so far."""
    body = dict(params.extra_body)
    options: dict[str, Any] = {"include_usage": True}
    if counts in ("usage", "tokenspout"):
        options["continuous_usage_stats"] = True
    if counts == "tokenspout":
        # An event per token, as vLLM and llama.cpp send (a tokenspout coalesces 5 by
        # default): this side coalesces for its own clients, and a token's text stays at
        # its own position, so that the continuation of a stream taken over from a dead
        # replica carries the same text at the positions its readers already have.
        options["flush_tokens"], options["flush_ms"] = 1, 0
    elif counts == "timings":
        body["timings_per_token"] = True
    body.update(model=params.model, stream=True, stream_options=options)
    # The client's limit comes with its other fields (``extra_body``), under its own name;
    # its value is tokenspout's (what is left of it after a first part).
    named = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
    body.pop("max_tokens", None)
    body.pop("max_completion_tokens", None)
    if params.max_tokens_given:
        body[named] = params.max_tokens
    if params.seed is not None:
        # Choice i of a request with n > 1 draws with seed + i (``choice_params``).
        body["seed"] = params.seed
    if not prompt.is_chat:
        body["prompt"] = prompt.text
        return "/completions", body
    body["messages"] = [_message(m) for m in prompt.messages]
    if prompt.continue_final_message:
        # vLLM's way to go on with the final assistant message (tokenspout speaks it too).
        body.update(continue_final_message=True, add_generation_prompt=False)
    elif not prompt.add_generation_prompt:
        body["add_generation_prompt"] = False
    return "/chat/completions", body


def _message(m: ChatMessage) -> dict[str, Any]:
    if m.sent is not None:
        return dict(m.sent)  # content parts of any type, fields tokenspout does not read
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
