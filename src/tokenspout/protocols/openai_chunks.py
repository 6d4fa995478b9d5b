"""OpenAI chat and completion payloads: streamed chunks and whole responses.

Shapes follow the OpenAI API reference for ``chat.completion.chunk`` and ``text_completion``;
with ``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last chunk
with empty ``choices`` carries the usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_errors import error_body


@dataclass(frozen=True)
class _OpenAIChunks:
    """Common fields of a stream's chunks: id, creation time, model, usage option."""

    id: str
    created: int
    model: str
    include_usage: bool = False
    ends_with_done = True

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

    def error(self, err: TokenspoutError) -> dict[str, Any]:
        return error_body(err)


class ChatChunks(_OpenAIChunks):
    """``chat.completion.chunk`` payloads; the opening chunk announces the assistant role."""

    OBJECT = "chat.completion.chunk"

    def _choice(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return [
            self._chunk(self.OBJECT, [self._choice({"role": "assistant", "content": ""}, None)])
        ]

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk(self.OBJECT, [self._choice({"content": text}, None)])

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        final = self._chunk(self.OBJECT, [self._choice({}, finish_reason)])
        return [final, *self._usage_chunk(self.OBJECT, usage)]

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The whole non-streamed ``chat.completion``."""
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.as_dict(),
        }


class CompletionChunks(_OpenAIChunks):
    """``text_completion`` payloads (streamed chunks share the object name with the response)."""

    OBJECT = "text_completion"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk(self.OBJECT, [self._choice(text, None)])

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        final = self._chunk(self.OBJECT, [self._choice("", finish_reason)])
        return [final, *self._usage_chunk(self.OBJECT, usage)]

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The whole non-streamed ``text_completion``."""
        return {
            "id": self.id,
            "object": self.OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(text, finish_reason)],
            "usage": usage.as_dict(),
        }
