"""A fault-injecting OpenAI-compatible upstream for the upstream engine's tests, run as its
own process: ``python -m tests.upstream_faults --port N``; ``POST /fault`` with
``{"fault": "cut", "after": 3}`` sets how it fails from then on.

It answers ``/v1/chat/completions`` and ``/v1/completions`` (always streamed, usage last)
with the synthetic engine's words, so that an answer it cuts can be finished exactly by a
synthetic tokenspout, and fails the way ``fault`` says:

* ``none``: answers normally; ``cut``: closes the connection after ``--after`` chunks;
  ``stall``: sends nothing more after ``--after`` chunks; ``malformed``: sends a chunk that
  is not JSON after ``--after`` chunks; ``endless``: then begins a ``data:`` line that never
  ends (64 KiB at a time, until its client leaves); ``exit``: the process dies after
  ``--after`` chunks (killed mid-stream); ``status``: answers ``status`` (with
  ``Retry-After: retry_after``, 1 s unless set, for 429) and an OpenAI error body (older
  vLLM's, ``{"object": "error", ...}``, with ``"shape": "vllm"``); ``slow``: waits
  ``delay_s`` before its first byte; ``tools``: streams a tool call (``get_weather``,
  arguments in pieces), cut after ``--after`` chunks with ``toolcut``; ``nousage``: closes
  the connection right after the finish reason (no usage, no ``[DONE]``); ``filtered``: ends
  with ``finish_reason: "content_filter"``; ``reasoning``: a chat answer begins with
  ``REASONING``'s pieces as ``reasoning_content`` deltas (one token each, counted in
  ``max_tokens`` and the usage, as vLLM's reasoning parsers send them), cut after
  ``--after`` chunks with ``reasoningcut``; ``refusal``: a chat answer is ``REFUSAL``'s
  pieces as ``refusal`` deltas (OpenAI's); ``finish``: ends the answer with ``finish_reason:
  reason`` after ``--after`` chunks, its usage and ``[DONE]`` (vLLM's ``abort`` when its
  engine aborts a request); ``ignoremax``: answers past the ``max_tokens`` it was sent (a
  thousand times as many tokens); ``noindex``: two tool calls as Gemini's OpenAI-compatible
  API streams them, without ``index`` (the first's arguments in pieces without id, the
  second whole), ``noid`` the same without any id; ``interleaved``: two parallel tool calls
  whose pieces interleave by ``index`` (both calls' first pieces, then each one's
  arguments), one piece a chunk, as vLLM can send them; ``badusage``: the finish chunk has a
  usage with null counts, the usage chunk ``usage: {}``; ``hang``: sends nothing more after
  the usage chunk (no ``[DONE]``, no end of the body); ``json``: a 200 with a whole chat
  completion (``application/json``) instead of a stream; ``pieces``: each word is ``pieces``
  tokens (3 unless set), as llama.cpp sends a character of several tokens: one chunk, one
  logprobs entry, ``timings.predicted_n`` counting them all (and the usage). A completion with
  ``echo`` has its
  prompt at the start of its first chunk; with ``logprobs`` each word is a token of logprob
  -1.0, an echoed prompt's first null (as vLLM and tokenspout send it).

``GET /stats`` tells what it received: the requests, the last body and headers, and the
answers ``abandoned`` (by their request's ``user`` field): their client went away before
their end, which a real upstream takes as the signal to abort the generation.
``--models`` (a JSON list of ``/v1/models`` entries) replaces the one model it serves,
``synthetic``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenspout.engine.request import ChatMessage, SamplingParams
from tokenspout.engine.synthetic_engine import SyntheticEngine

MODEL = "synthetic"


FAULTS = ("none", "cut", "stall", "malformed", "endless", "exit", "status", "slow",
          "tools", "toolcut", "nousage", "filtered", "reasoning", "reasoningcut",
          "refusal", "finish", "ignoremax", "noindex", "noid", "interleaved", "badusage",
          "hang", "json", "pieces")  # fmt: skip
#: A reasoning model's reasoning before its answer, and a refusal, one token a piece.
REASONING = ("Let ", "me ", "think.")
REFUSAL = ("I can't ", "help with ", "that.")
#: The cities of the ``interleaved`` calls to ``get_weather``, the first call's first.
INTERLEAVED = ("Paris", "Rome")


class FaultyUpstream:
    def __init__(self, models: list[dict[str, Any]]) -> None:
        self.args = argparse.Namespace(
            fault="none",
            after=3,
            status=500,
            delay_s=5.0,
            retry_after=1,
            shape="openai",
            reason="abort",
            pieces=3,
        )
        self.engine = SyntheticEngine()
        self.served = models
        self.received = 0
        self.abandoned: list[str] = []
        self.last_body: dict[str, Any] = {}
        self.last_headers: dict[str, str] = {}

    async def models(self, request: Request) -> Response:
        data = [{"object": "model", **entry} for entry in self.served]
        return JSONResponse({"object": "list", "data": data})

    async def set_fault(self, request: Request) -> Response:
        given = await request.json()
        assert given.get("fault", "none") in FAULTS
        self.args = argparse.Namespace(**{**vars(self.args), **given})
        return JSONResponse(vars(self.args))

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "received": self.received,
                "abandoned": self.abandoned,
                "body": self.last_body,
                "headers": self.last_headers,
            }
        )

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.received += 1
        self.last_body = body
        self.last_headers = dict(request.headers)
        args = self.args
        if args.fault == "status":
            error = {"message": f"fault injected: {args.status}", "type": "invalid_request_error",
                     "param": "temperature", "code": "injected"}  # fmt: skip
            headers = {"Retry-After": str(args.retry_after)} if args.status == 429 else {}
            if args.shape == "vllm":
                old = {"object": "error", "message": error["message"], "type": "BadRequestError",
                       "param": None, "code": args.status}  # fmt: skip
                return JSONResponse(old, status_code=args.status, headers=headers)
            return JSONResponse({"error": error}, status_code=args.status, headers=headers)
        if args.fault == "slow":
            await asyncio.sleep(args.delay_s)
        if args.fault == "json":
            message = {"role": "assistant", "content": "whole"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return JSONResponse({"object": "chat.completion", "choices": [choice]})
        if args.fault in ("tools", "toolcut"):
            cut_after = args.after if args.fault == "toolcut" else None
            return self._stream(request, body, _tool_call(cut_after))
        if args.fault in ("noindex", "noid"):
            return self._stream(request, body, _tool_calls_without_index(args.fault == "noindex"))
        if args.fault == "interleaved":
            return self._stream(request, body, _interleaved_tool_calls())
        if args.fault == "refusal":
            return self._stream(request, body, _refusal())
        chat = "messages" in body
        reasoning = REASONING if chat and args.fault in ("reasoning", "reasoningcut") else ()
        if chat:
            messages = [ChatMessage(m["role"], _text(m.get("content"))) for m in body["messages"]]
            prompt = self.engine.encode_chat(
                messages,
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False),
            )
        else:
            prompt = self.engine.encode_completion(body["prompt"])
        # No max_tokens: the context's room, as vLLM and llama.cpp fill it in.
        room = self.engine.max_model_len - len(prompt.token_ids or ())
        limit = body.get("max_completion_tokens", body.get("max_tokens", room)) - len(reasoning)
        if args.fault == "finish":
            limit = min(limit, args.after)  # then ends with its own reason
        elif args.fault == "ignoremax":
            limit *= 1000
        elif args.fault == "pieces":
            limit = -(-limit // args.pieces)  # words of ``pieces`` tokens each
        params = SamplingParams(max_tokens=limit)
        # A completion's echo comes first in the first chunk, as vLLM and tokenspout send it.
        echo = body["prompt"] if body.get("echo") else ""
        logprobs = body.get("logprobs") is not None
        chunks = self._chunks(prompt, params, chat, echo, logprobs, reasoning)
        return self._stream(request, body, chunks)

    def _stream(
        self, request: Request, body: dict[str, Any], chunks: AsyncIterator[str]
    ) -> StreamingResponse:
        """An SSE response of ``chunks``, ``_watched``."""
        return StreamingResponse(
            self._watched(request, body, chunks), media_type="text/event-stream"
        )

    async def _watched(
        self, request: Request, body: dict[str, Any], chunks: AsyncIterator[str]
    ) -> AsyncIterator[str]:
        """``chunks`` until the client goes away, as a real upstream does (vLLM and
        llama.cpp check for it while they generate); the answer is then abandoned. Sending
        to a client that left does not fail, so each chunk asks first; Starlette cancels a
        response that is waiting for a chunk when its client disconnects."""
        user = str(body.get("user", ""))
        try:
            async for chunk in chunks:
                if await request.is_disconnected():
                    self.abandoned.append(user)
                    return
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.abandoned.append(user)
            raise

    async def _chunks(
        self,
        prompt: Any,
        params: SamplingParams,
        chat: bool,
        echo: str,
        logprobs: bool,
        reasoning: tuple[str, ...],
    ) -> AsyncIterator[str]:
        args = self.args
        sent = 0
        rid = f"faulty-{self.received}"
        for piece in reasoning:
            if sent == args.after and args.fault == "reasoningcut":
                raise ConnectionAbortedError("fault injected: cut in the middle of reasoning")
            yield _event(_delta({"content": None, "reasoning_content": piece}, None))
            sent += 1
        async for out in self.engine.generate(rid, prompt, params):
            if sent == args.after and args.fault in ("cut", "stall", "malformed", "endless",
                                                     "exit", "reasoningcut"):  # fmt: skip
                if args.fault == "endless":
                    yield 'data: {"never": "'
                    while True:
                        yield "x" * 65536
                if args.fault == "cut":
                    raise ConnectionAbortedError("fault injected: cut")
                if args.fault == "exit":
                    os._exit(1)
                if args.fault == "malformed":
                    yield "data: {not json\n\n"
                await asyncio.sleep(3600)
            if out.text:
                # Each word is one token (-1.0); an echoed prompt's first has none (null).
                echoed = bool(echo) and not sent
                words = [*re.findall(r"\S+\s*|\s+", echo), out.text] if echoed else [out.text]
                chunk = _chunk(chat, "".join(words), None)
                if logprobs:
                    chunk["choices"][0]["logprobs"] = _completion_logprobs(words, echoed)
                if args.fault == "pieces":
                    generated = out.completion_tokens * args.pieces
                    chunk["timings"] = {"prompt_n": out.prompt_tokens, "predicted_n": generated}
                yield _event(chunk)
                sent += 1
            if out.finish_reason is not None:
                finish = {"filtered": "content_filter", "finish": args.reason}.get(
                    args.fault, out.finish_reason
                )
                last = _chunk(chat, "", finish)
                if args.fault == "badusage":
                    last["usage"] = {"prompt_tokens": out.prompt_tokens,
                                     "completion_tokens": None, "total_tokens": None}  # fmt: skip
                yield _event(last)
                if args.fault == "nousage":
                    raise ConnectionAbortedError("fault injected: cut after the finish")
                completion = out.completion_tokens + len(reasoning)
                if args.fault == "pieces":
                    completion *= args.pieces
                usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": completion,
                         "total_tokens": out.prompt_tokens + completion}  # fmt: skip
                if args.fault == "badusage":
                    usage = {}
                yield _event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
                if args.fault == "hang":
                    await asyncio.sleep(3600)
        yield "data: [DONE]\n\n"


async def _tool_call(cut_after: int | None) -> AsyncIterator[str]:
    start = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    yield _event(_delta({"role": "assistant", "tool_calls": [start]}, None))
    for sent, piece in enumerate(('{"city": ', '"Paris"', "}"), start=1):
        yield _event(_delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None))
        if sent == cut_after:
            raise ConnectionAbortedError("fault injected: cut in the middle of a tool call")
    yield _event(_delta({}, "tool_calls"))
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    yield _event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _tool_calls_without_index(ids: bool) -> AsyncIterator[str]:
    """Tool calls as Gemini's OpenAI-compatible API and some proxies stream them: no
    ``index``; here the first call's arguments come in pieces without id either, and
    without ``ids`` no piece has one."""
    first = {"type": "function", "function": {"name": "get_weather", "arguments": ""}}
    second = {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    if ids:
        first, second = {"id": "call_1", **first}, {"id": "call_2", **second}
    yield _event(_delta({"role": "assistant", "tool_calls": [first]}, None))
    for piece in ('{"city": ', '"Paris"', "}"):
        yield _event(_delta({"tool_calls": [{"function": {"arguments": piece}}]}, None))
    yield _event(_delta({"tool_calls": [second]}, None))
    yield _event(_delta({}, "tool_calls"))
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    yield _event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _interleaved_tool_calls() -> AsyncIterator[str]:
    """Two parallel calls, each piece naming its call by ``index`` only: both calls' first
    pieces (id and name), then the first's arguments, then the second's."""
    for index in range(len(INTERLEAVED)):
        start = {"index": index, "id": f"call_{index + 1}", "type": "function",
                 "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
        yield _event(_delta({"tool_calls": [start]}, None))
    for index, city in enumerate(INTERLEAVED):
        arguments = json.dumps({"city": city})
        yield _event(
            _delta({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}, None)
        )
    yield _event(_delta({}, "tool_calls"))
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    yield _event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _refusal() -> AsyncIterator[str]:
    """A refusal as OpenAI streams one: the role with ``refusal: null``, then its pieces."""
    yield _event(_delta({"role": "assistant", "content": None, "refusal": None}, None))
    for piece in REFUSAL:
        yield _event(_delta({"refusal": piece}, None))
    yield _event(_delta({}, "stop"))
    n = len(REFUSAL)
    usage = {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}
    yield _event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def _completion_logprobs(words: list[str], echoed: bool) -> dict[str, Any]:
    """The legacy ``logprobs`` of ``words``, the first null when it is an echoed prompt's."""
    values: list[float | None] = [-1.0] * len(words)
    tops: list[dict[str, float] | None] = [{w: -1.0} for w in words]
    if echoed:
        values[0] = tops[0] = None
    return {"tokens": words, "token_logprobs": values, "top_logprobs": tops}


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: its text parts a line apart (as vLLM joins them), others unread."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part["type"] == "text")


def _delta(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "x", "object": "chunk", "model": MODEL, "choices": [choice]}


def _chunk(chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        delta = {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    return {"id": "x", "object": "chunk", "model": MODEL, "choices": [choice]}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", type=json.loads, default=[{"id": MODEL}])
    given = parser.parse_args()
    port = given.port
    upstream = FaultyUpstream(given.models)
    app = Starlette(
        routes=[
            Route("/v1/models", upstream.models),
            Route("/stats", upstream.stats),
            Route("/fault", upstream.set_fault, methods=["POST"]),
            Route("/v1/chat/completions", upstream.generate, methods=["POST"]),
            Route("/v1/completions", upstream.generate, methods=["POST"]),
        ]
    )
    # Stopped at once: a stalled answer would otherwise hold the shutdown for its whole sleep.
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=0.5
    )


if __name__ == "__main__":
    main()
