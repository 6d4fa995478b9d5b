"""Request bodies as pydantic models: types are strict so that a wrong type is a 400 that
names the field, not a silent coercion."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0, strict=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (SDKs send extras).
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    """OpenAI's ``stream_options`` plus our coalescing and resume knobs."""

    include_usage: StrictBool = False
    flush_tokens: PositiveInt | None = None
    flush_ms: Annotated[float, Field(ge=0.0, le=10_000.0, strict=False)] | None = None
    resumable: StrictBool | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _GenerationBody(_Body):
    """Fields shared by chat and completions."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    logprobs: StrictBool | StrictInt | None = None
    #: Not implemented: refused (never accepted and ignored). The one place it is refused.
    logit_bias: object = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: object) -> object:
        if value is not None and value != {}:
            raise ValueError("logit_bias is not supported by this server")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_GenerationBody):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt is supported (a string or a list of one string)")
        return prompt

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class SeedStreamRequest(_Body):
    """The seed article's body: ``{"prompt": "...", "max_tokens": N}``."""

    prompt: str
    max_tokens: PositiveInt | None = None
    model: str | None = None
    temperature: Temperature = 1.0
    seed: StrictInt | None = None
    stream_options: StreamOptions | None = None
