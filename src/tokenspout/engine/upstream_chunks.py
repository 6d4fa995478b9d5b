"""One OpenAI streaming chunk from an upstream, as what the relay needs of it.

Chat chunks carry ``choices[0].delta`` (``content``, ``tool_calls``, and from reasoning
models ``reasoning_content`` or ``reasoning``, from OpenAI a ``refusal``), completion chunks
``choices[0].text``; with ``stream_options.include_usage`` the last chunk has no choices and
the ``usage``. A chat stream usually opens with a chunk that has only the role
(``{"role": "assistant", "content": ""}``), sent before any token is generated: no output
yet. Anything that is not such a chunk is a ``MalformedChunkError``: the relay then treats
the upstream as failed, as it would a cut connection. What some servers leave out or send
empty is made good instead: a tool call's ``index`` and ``id`` (``ToolCallSlots``), a
``usage`` without its counts (taken as no usage: the relay counts the answer itself, as for
an upstream that sends none).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, NamedTuple

from tokenspout.engine.request import TokenLogprob, ToolCallDelta


class MalformedChunkError(ValueError):
    """An upstream sent something that is not an OpenAI streaming chunk."""


class UpstreamChunk(NamedTuple):
    """What one chunk adds: text, tool-call pieces, the finish reason, the usage."""

    text: str
    tool_calls: tuple[ToolCallDelta, ...]
    finish_reason: str | None
    #: (prompt_tokens, completion_tokens) when the chunk reports usage.
    usage: tuple[int, int] | None
    #: The logprobs of the chunk's tokens, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    #: Tokens generated so far, this chunk's included, when the upstream says (the usage of
    #: a chunk with choices, or llama.cpp's ``timings.predicted_n``).
    generated: int | None = None
    #: It carries some of the answer: not a chat's opening role alone, nor usage alone.
    output: bool = True
    #: A piece of the reasoning: ``reasoning_content`` (vLLM's reasoning parsers,
    #: DeepSeek's API) or ``reasoning`` (newer vLLM's name for it).
    reasoning: str = ""
    #: A piece of a refusal (OpenAI's ``refusal``).
    refusal: str = ""
    #: The prompt's tokens, when a chunk without usage says (llama.cpp's ``timings``:
    #: ``prompt_n`` computed, ``cache_n`` from its cache).
    prompt_tokens: int | None = None


class ToolCallSlots:
    """The index and id of each tool call of one streamed answer, for the pieces that
    leave them out (Gemini's OpenAI-compatible API, some proxies). A piece whose ``id``
    is new, or which has a name and no id, begins the next call; one with a known id
    goes on with that call; one with neither (more of the arguments) goes on with the
    last call. A piece that gives its index keeps it, unless it has a new id under an
    index begun by another call. A call's first piece has its id (one made up when the
    upstream gave none: clients match a call's result to it by its id, and the relayed
    delta names the function only on a piece with an id); the later pieces have none, as
    OpenAI sends them."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._begun: set[int] = set()
        self._last = -1
        self._next = 0

    def place(self, given: Any, call_id: Any, name: Any) -> tuple[int, str | None]:
        """The piece's index, and its id when it begins its call (else None)."""
        if call_id and call_id not in self._ids and given is not None and int(given) in self._begun:
            # A new call under an index another call has: the next place, rather than one
            # call of two names whose arguments run together.
            given = None
        if given is not None:
            index = int(given)
        elif call_id and call_id in self._ids:
            index = self._ids[call_id]
        elif call_id or name or self._last < 0:
            index = self._next
        else:
            index = self._last
        if call_id:
            self._ids.setdefault(call_id, index)
        self._last, self._next = index, max(self._next, index + 1)
        if index in self._begun:
            return index, None
        self._begun.add(index)
        return index, str(call_id) if call_id else f"call_{uuid.uuid4().hex[:24]}"


def parse_chunk(data: str | bytes, slots: ToolCallSlots | None = None) -> UpstreamChunk:
    """The chunk in one SSE ``data:`` field; ``MalformedChunkError`` for anything else,
    including an ``{"error": ...}`` (older vLLM: ``{"object": "error", "message": ...}``)
    an upstream sends when it fails mid-stream, with its message. ``slots``
    are the answer's tool calls so far (a chunk's own when not given)."""
    try:
        # Bytes decoded here: json.loads would first guess their encoding (SSE is UTF-8).
        chunk = json.loads(data.decode() if isinstance(data, bytes) else data)
    except UnicodeDecodeError:
        raise MalformedChunkError("a chunk that is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise MalformedChunkError(f"a chunk that is not JSON ({exc})") from None
    if not isinstance(chunk, dict):
        raise MalformedChunkError("a chunk that is not a JSON object")
    error = error_object(chunk)
    if error is not None:
        said = str(error.get("message", error))[:200]
        raise MalformedChunkError(f"an error in the stream: {said}")
    try:
        usage = _usage(chunk.get("usage"))
        choices = chunk["choices"]
        if not choices:
            return UpstreamChunk("", (), None, usage, output=False)
        choice = choices[0]
        delta = choice.get("delta")
        logprobs = choice.get("logprobs")
        reasoning = refusal = ""
        if delta is None:  # a completion chunk
            text, calls = choice.get("text") or "", ()
            tokens = _completion_logprobs(logprobs) if logprobs else ()
            said = bool(text)
        else:
            text = delta.get("content") or ""
            slots = slots or ToolCallSlots()
            calls = tuple(_tool_call(c, slots) for c in delta.get("tool_calls") or ())
            tokens = tuple(_chat_logprob(t) for t in (logprobs or {}).get("content") or ())
            # vLLM versions in between send the same piece under both names: one is taken.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            refusal = delta.get("refusal") or ""
            # Any field but the role counts, the ones not relayed too: the upstream is
            # generating. The usual chunk, with text, is not looked through (one per token).
            said = bool(text) or any(value for key, value in delta.items() if key != "role")
        finish = choice.get("finish_reason")
        if not all(isinstance(s, str) for s in (text, reasoning, refusal)) or not (
            finish is None or isinstance(finish, str)
        ):
            raise TypeError("a text or the finish_reason of the wrong type")
        prompt: int | None = None
        if usage is not None:
            generated: int | None = usage[1]
        elif (timings := chunk.get("timings")) is not None:
            generated = int(timings["predicted_n"])
            if "prompt_n" in timings:
                prompt = int(timings["prompt_n"]) + int(timings.get("cache_n") or 0)
        else:
            generated = None
        output = said or bool(tokens) or finish is not None or bool(generated)
        return UpstreamChunk(
            text, calls, finish, usage, tokens, generated, output, reasoning, refusal, prompt
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise MalformedChunkError(f"a chunk of an unexpected shape ({exc!r})") from None


def _usage(usage: Any) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens); None for no usage, and for one without both
    counts (``{}``, a null count), which says nothing the relay can use either."""
    if not isinstance(usage, dict):
        return None
    try:
        counts = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        return None
    return counts if min(counts) >= 0 else None


def _tool_call(call: dict[str, Any], slots: ToolCallSlots) -> ToolCallDelta:
    function = call.get("function") or {}
    name = function.get("name")
    index, call_id = slots.place(call.get("index"), call.get("id"), name)
    return ToolCallDelta(index, call_id, name, function.get("arguments") or "")


def error_object(body: Any) -> dict[str, Any] | None:
    """The error an upstream's JSON (a chunk, or a refusal's body) says, in OpenAI's shape:
    ``{"error": {...}}`` (a bare ``{"error": "text"}`` as its message) or older vLLM's
    unwrapped ``{"object": "error", "message": ...}``, the object itself; None when
    ``body`` is not one."""
    if not isinstance(body, dict):
        return None
    if body.get("object") == "error":
        return dict(body)
    if "error" not in body:
        return None
    error = body["error"]
    return error if isinstance(error, dict) else {"message": str(error)}


def _chat_logprob(entry: dict[str, Any]) -> TokenLogprob:
    top = tuple(
        (t["token"], _bytes(t), float(t["logprob"])) for t in entry.get("top_logprobs") or ()
    )
    return TokenLogprob(entry["token"], _bytes(entry), _logprob(entry["logprob"]), top)


def _completion_logprobs(logprobs: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """The legacy completions shape: parallel lists, alternatives as token -> logprob; or
    the chat shape (``content``: one entry per token), which llama.cpp's server sends for
    completions too."""
    if "content" in logprobs and "tokens" not in logprobs:
        return tuple(_chat_logprob(t) for t in logprobs["content"] or ())
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return tuple(
        TokenLogprob(
            token,
            token.encode(),
            _logprob(logprob),
            tuple((t, t.encode(), float(lp)) for t, lp in (top or {}).items()),
        )
        for token, logprob, top in zip(
            logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True
        )
    )


def _logprob(value: Any) -> float | None:
    """A token's logprob; null for an echoed prompt's first token, which has none (nothing
    comes before it: vLLM and tokenspout send null, and its ``top_logprobs`` entry null)."""
    return None if value is None else float(value)


def _bytes(entry: dict[str, Any]) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if raw is not None else str(entry["token"]).encode()
