"""OpenAI chat and completion payloads: streamed chunks and whole responses.

Shapes follow the OpenAI API reference for ``chat.completion.chunk`` and ``text_completion``;
with ``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last chunk
with empty ``choices`` carries the usage. Tokens with extras (``OutputExtras``) add chat's
``logprobs.content`` / ``delta.tool_calls`` (name first, arguments in pieces) or the legacy
completions ``logprobs`` object. An upstream's reasoning and refusal go out as chat's
``delta.reasoning_content`` (vLLM's long-standing name, which DeepSeek's API uses too) and
``delta.refusal`` (OpenAI's), and in a whole response as the message's fields of those
names; each only when there is some, their pieces joined in order.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tokenspout.engine.request import OutputExtras, TokenLogprob, ToolCallDelta
from tokenspout.engine.tool_calls import merge_calls
from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_errors import error_body


class ChoiceOutput(NamedTuple):
    """One choice of a whole (non-streamed) response."""

    text: str
    finish_reason: str
    extras: Sequence[OutputExtras] = ()


@dataclass(frozen=True)
class _OpenAIChunks:
    """Common fields of a stream's chunks: id, creation time, model, usage option."""

    id: str
    created: int
    model: str
    include_usage: bool = False
    #: Each chunk's ``usage`` is the usage so far (``usage_so_far``), not null.
    continuous_usage: bool = False
    #: Logprobs were asked for: a whole answer without tokens has empty ones, not null (a
    #: client that reads them would fail on null), as OpenAI's and vLLM's servers answer.
    #: An answer with text but none (an upstream that did not give them: llama.cpp for
    #: ``logprobs: 0``) has null, never empty lists that would say it had no tokens.
    logprobs: bool = False
    ends_with_done = True
    typed_events = False

    def _chunk(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage_chunk(self, object_: str, usage: Usage) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        chunk = self._chunk(object_, [])
        chunk["usage"] = usage.as_dict()
        return [chunk]

    @staticmethod
    def usage_so_far(chunk: dict[str, Any], usage: Usage) -> dict[str, Any]:
        """``chunk`` with ``usage`` (continuous usage): the tokens up to and including its own."""
        chunk["usage"] = usage.as_dict()
        return chunk

    def error(self, err: TokenspoutError) -> dict[str, Any]:
        return error_body(err)


class ChatChunks(_OpenAIChunks):
    """``chat.completion.chunk`` payloads; the opening chunk announces the assistant role.
    ``index`` is the choice's (``n > 1``)."""

    OBJECT = "chat.completion.chunk"

    def _choice(
        self, delta: dict[str, Any], finish_reason: str | None, index: int = 0
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self, index: int = 0) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [self._chunk(self.OBJECT, [self._choice(role, None, index)])]

    def delta(self, text: str, index: int = 0) -> dict[str, Any]:
        return self._chunk(self.OBJECT, [self._choice({"content": text}, None, index)])

    def delta_with(self, text: str, extras: list[OutputExtras], index: int = 0) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text} if text else {}
        calls = _tool_call_deltas([d for x in extras for d in x.tool_calls])
        if calls:
            delta["tool_calls"] = calls
        delta.update(side_texts(extras))
        choice = self._choice(delta, None, index)
        choice["logprobs"] = _chat_logprobs(extras)
        return self._chunk(self.OBJECT, [choice])

    def choice_end(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        """The chunk that ends one choice."""
        return self._chunk(self.OBJECT, [self._choice({}, finish_reason, index)])

    def usage_end(self, usage: Usage) -> list[dict[str, Any]]:
        """What follows the last choice's end: the usage chunk, if asked for."""
        return self._usage_chunk(self.OBJECT, usage)

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        return [self.choice_end(finish_reason), *self.usage_end(usage)]

    def response(
        self, text: str, finish_reason: str, usage: Usage, extras: Sequence[OutputExtras] = ()
    ) -> dict[str, Any]:
        """The whole non-streamed ``chat.completion``."""
        return self.response_choices([ChoiceOutput(text, finish_reason, extras)], usage)

    def response_choices(self, choices: Sequence[ChoiceOutput], usage: Usage) -> dict[str, Any]:
        """The whole ``chat.completion`` of ``n`` choices (``choices[i]`` is index ``i``)."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._message_choice(c, i, self.logprobs) for i, c in enumerate(choices)],
            "usage": usage.as_dict(),
        }

    @staticmethod
    def _message_choice(output: ChoiceOutput, index: int, logprobs: bool) -> dict[str, Any]:
        text, finish_reason, extras = output
        calls = merge_calls([d for x in extras for d in x.tool_calls])
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["content"] = text or None
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        side = side_texts(extras)
        if "refusal" in side:
            # As OpenAI answers a refusal: no content.
            message["content"] = text or None
        message.update(side)
        return {
            "index": index,
            "message": message,
            "logprobs": _chat_logprobs(extras)
            or ({"content": []} if logprobs and not text else None),
            "finish_reason": finish_reason,
        }


@dataclass(frozen=True)
class CompletionChunks(_OpenAIChunks):
    """``text_completion`` payloads (streamed chunks share the object name with the response).

    ``text_offset`` in logprobs counts characters of the answer, per choice: a token that
    ends inside a character adds nothing, the one that completes it adds the character. A
    reader that starts later (a resumed one) counts on from the events it skips (``skip``).
    """

    OBJECT = "text_completion"
    #: Characters sent so far per choice, for ``text_offset`` (one encoder per response).
    _offset: dict[int, int] = field(default_factory=dict)
    #: Per choice, the tokens' bytes decoded so far (a character's first bytes wait in it).
    _text: dict[int, codecs.IncrementalDecoder] = field(default_factory=dict)

    def _choice(self, text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self, index: int = 0) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str, index: int = 0) -> dict[str, Any]:
        return self._chunk(self.OBJECT, [self._choice(text, None, index)])

    def delta_with(self, text: str, extras: list[OutputExtras], index: int = 0) -> dict[str, Any]:
        choice = self._choice(text, None, index)
        choice["logprobs"] = self._logprobs(extras, index)
        return self._chunk(self.OBJECT, [choice])

    def choice_end(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        """The chunk that ends one choice."""
        return self._chunk(self.OBJECT, [self._choice("", finish_reason, index)])

    def skip(self, extras: Sequence[OutputExtras], index: int = 0) -> None:
        """Count the tokens of events this reader does not get, those before a resumed
        reader's start, as if it had: its ``text_offset`` then go on from there."""
        self._logprobs(extras, index)

    def usage_end(self, usage: Usage) -> list[dict[str, Any]]:
        """What follows the last choice's end: the usage chunk, if asked for."""
        return self._usage_chunk(self.OBJECT, usage)

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        return [self.choice_end(finish_reason), *self.usage_end(usage)]

    def response(
        self, text: str, finish_reason: str, usage: Usage, extras: Sequence[OutputExtras] = ()
    ) -> dict[str, Any]:
        """The whole non-streamed ``text_completion``."""
        return self.response_choices([ChoiceOutput(text, finish_reason, extras)], usage)

    def response_choices(self, choices: Sequence[ChoiceOutput], usage: Usage) -> dict[str, Any]:
        """The whole ``text_completion`` of ``n`` choices (``choices[i]`` is index ``i``)."""
        out = []
        for i, (text, finish_reason, extras) in enumerate(choices):
            choice = self._choice(text, finish_reason, i)
            choice["logprobs"] = self._logprobs(extras, i) or (
                {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if self.logprobs and not text
                else None
            )
            out.append(choice)
        return {
            "id": self.id,
            "object": self.OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": usage.as_dict(),
        }

    def _logprobs(self, extras: Sequence[OutputExtras], index: int = 0) -> dict[str, Any] | None:
        """The legacy ``logprobs`` object of the completions API; with echo, the prompt's
        tokens first (the first with null logprobs)."""
        tokens: list[TokenLogprob] = []
        for x in extras:
            tokens += x.prompt_logprobs
            if x.logprob is not None:
                tokens.append(x.logprob)
        if not tokens:
            return None
        offset = self._offset.get(index, 0)
        text = self._text.setdefault(index, codecs.getincrementaldecoder("utf-8")("replace"))
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(text.decode(t.bytes))
        self._offset[index] = offset
        return {
            "tokens": [_legacy_token(t.token, t.bytes) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [_legacy_top(t) for t in tokens],
            "text_offset": offsets,
        }


def _legacy_token(token: str, raw: bytes) -> str:
    """A token as the legacy API writes it: its text, or, when its bytes are not whole UTF-8
    characters (a part of one), ``bytes:`` and their escapes, as OpenAI does (``"\ufffd"``
    for every such part made different tokens one key of ``top_logprobs``)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return token


def _legacy_top(t: TokenLogprob) -> dict[str, float] | None:
    """A token's entry in the legacy ``top_logprobs``: its alternatives and the token itself,
    which that API always lists ("up to logprobs+1 elements"; chat's ``top_logprobs`` does
    not). The token goes last so that an alternative with the same text cannot hide its
    logprob; when it is not among the alternatives it is less likely than all of them, so the
    entry stays most likely first. None for an echoed prompt's first token, which has no
    logprob."""
    if t.logprob is None:
        return None
    top = {_legacy_token(tok, raw): lp for tok, raw, lp in t.top}
    return {**top, _legacy_token(t.token, t.bytes): t.logprob}


def _chat_logprobs(extras: Sequence[OutputExtras]) -> dict[str, Any] | None:
    tokens = [x.logprob for x in extras if x.logprob is not None]
    return {"content": [_chat_token(t) for t in tokens]} if tokens else None


def _chat_token(t: TokenLogprob) -> dict[str, Any]:
    return {
        "token": t.token,
        "logprob": t.logprob,
        "bytes": list(t.bytes),
        "top_logprobs": [
            {"token": tok, "logprob": lp, "bytes": list(raw)} for tok, raw, lp in t.top
        ],
    }


def side_texts(extras: Sequence[OutputExtras]) -> dict[str, str]:
    """``reasoning_content`` and ``refusal``: the extras' pieces of each joined, each only
    when there are some."""
    reasoning = "".join(x.reasoning for x in extras)
    refusal = "".join(x.refusal for x in extras)
    return {
        **({"reasoning_content": reasoning} if reasoning else {}),
        **({"refusal": refusal} if refusal else {}),
    }


def _tool_call_deltas(deltas: Sequence[ToolCallDelta]) -> list[dict[str, Any]]:
    """OpenAI's ``delta.tool_calls``: a call's first piece has its id, type and name; the
    pieces of one call that arrive together are sent as one."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if d.id is not None:
            function = {"name": d.name, "arguments": d.arguments}
            out.append({"index": d.index, "id": d.id, "type": "function", "function": function})
        elif out and out[-1]["index"] == d.index:
            out[-1]["function"]["arguments"] += d.arguments
        else:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out
