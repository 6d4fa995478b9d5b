"""Request bodies as pydantic models: types are strict so that a wrong type is a 400 that
names the field, not a silent coercion, and an unknown field is a 400 that names it (a field
we do not know is one we would otherwise accept and ignore). The README's table lists the
fields; the OpenAPI schema documents each."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from tokenspout.engine.request import MAX_LOGIT_BIAS, MAX_SEED, MAX_TOP_LOGPROBS, MIN_SEED
from tokenspout.errors import InvalidRequestError

# A float field, strict like the rest, takes an integer (as OpenAI does) but never a string
# or a boolean.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
#: Most choices one request may ask for (``n``): each is a stream of its own.
MAX_CHOICES = 8
PositiveInt = Annotated[StrictInt, Field(ge=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[StrictInt, Field(ge=MIN_SEED, le=MAX_SEED)]
#: ``stream_options.flush_ms``: how long an event may wait to coalesce tokens.
FlushMs = Annotated[float, Field(ge=0.0, le=10_000.0)]


def _null_allowed(schema: dict[str, Any]) -> None:
    """The JSON schema says what ``StrictBody._null_is_unset`` accepts: every optional field
    may be null. Without it a schema-driven client or fuzzer takes a null for invalid input
    that the server accepts."""
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        if name in required:
            continue
        alternatives = field.get("anyOf", [field])
        if any(alternative.get("type") == "null" for alternative in alternatives):
            continue
        notes = {key: field.pop(key) for key in ("title", "description", "default") if key in field}
        schema["properties"][name] = {"anyOf": [field, {"type": "null"}], **notes}


class StrictBody(BaseModel):
    """A request body (or a part of one): strict types, unknown fields refused, null is
    unset."""

    # Attribute docstrings become the fields' descriptions in the OpenAPI schema.
    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True, json_schema_extra=_null_allowed
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """A field given as null is a field not given, as in OpenAI's API: the openai SDK
        sends null for a parameter passed as None, and a message it returns carries null
        ``refusal``, ``audio``... when sent back. A field with a value is checked as ever
        (an unknown one is a 400 that names it)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(StrictBody):
    """OpenAI's ``stream_options`` plus our coalescing and resume knobs."""

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False
    """vLLM's: with ``include_usage``, every chunk carries the usage so far."""
    flush_tokens: PositiveInt | None = None
    flush_ms: FlushMs | None = None
    resumable: StrictBool | None = None
    include_obfuscation: StrictBool = False
    """OpenAI's: no obfuscation padding is added to the chunks, so only false is served."""


class SeedStreamOptions(StrictBody):
    """The seed endpoint's ``stream_options``: the coalescing and resume knobs its query
    takes. ``include_usage`` and ``continuous_usage_stats`` only false: a ``{"token": ...}``
    event has no place for a usage, so asking for one is a 400 (``prepare_seed``)
    rather than a usage never sent."""

    flush_tokens: PositiveInt | None = None
    flush_ms: FlushMs | None = None
    resumable: StrictBool | None = None
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class TextPart(StrictBody):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    """A caching hint (Anthropic's, as litellm sends it): accepted; prompt prefixes are
    cached automatically."""


class FunctionCallIn(StrictBody):
    name: StrictStr
    arguments: StrictStr
    """A JSON object, as text (OpenAI's shape)."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        return json_object_text(arguments)


def json_object_text(arguments: str) -> str:
    """``arguments`` if it is a JSON object's text; ValueError (a validation error of the
    field) otherwise."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"arguments must be JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("arguments must be a JSON object")
    return arguments


class ToolCallIn(StrictBody):
    """A call an earlier assistant message made."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: StrictStr | None = None
    """Accepted for OpenAI compatibility; chat templates do not render it (an upstream is
    sent it)."""
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None
    """An assistant's reasoning (vLLM's field, as tokenspout returns it in front of a
    reasoning model), so that a message can be sent back as returned: not rendered in the
    prompt, as vLLM's templates drop reasoning from the history (an upstream is sent it)."""
    reasoning: StrictStr | None = None
    """vLLM's newer name for ``reasoning_content``: likewise not rendered."""
    refusal: StrictStr | None = None
    """An assistant's refusal (OpenAI's): without content, it is what the assistant said
    and is rendered as its content."""
    annotations: list[dict[str, Any]] | None = None
    """OpenAI's citations of an assistant's answer (it returns ``[]`` on every message):
    metadata, not words, so not rendered (an upstream is sent them)."""

    #: The fields only an assistant's message carries (``tool_calls`` aside).
    ASSISTANT_ONLY: ClassVar[tuple[str, ...]] = (
        "reasoning_content", "reasoning", "refusal", "annotations",
    )  # fmt: skip

    def text(self) -> str:
        """The content's text: its text parts, a line apart, as vLLM's server joins them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if part.text is not None)


def refuse_unread_parts(content: Any, message: str, readable: Collection[str], why: str) -> None:
    """Refuse the first part of a message's ``content`` (as sent, before validation) whose
    type is not ``readable`` (an image, audio, a file), in one error that names it
    (``{message}.content[j]``, as other message errors spell a place) and says ``why``,
    rather than pydantic's mismatch with each member of the content's union."""
    for j, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in readable:
            param = f"{message}.content[{j}]"
            raise InvalidRequestError(
                f'{param}: content parts of type "{kind}" are not supported: {why}', param=param
            )


def _text_parts_only(data: Any) -> Any:
    """Refuse a chat message's content part the model cannot read (``refuse_unread_parts``)."""
    messages = data.get("messages") if isinstance(data, dict) else None
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        refuse_unread_parts(content, f"messages[{i}]", ("text",), "the model reads text only")
    return data


class UpstreamContentPart(StrictBody):
    """A content part of any type (``text``, ``image_url``, ``input_audio``, ``file``...),
    kept as sent for an upstream, which reads what tokenspout does not (a vision model)."""

    model_config = ConfigDict(extra="allow", strict=True, use_attribute_docstrings=True)

    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> UpstreamContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs text")
        return self


class UpstreamChatMessageIn(ChatMessageIn):
    """In front of other servers: a message goes upstream as sent, content parts of any
    type and fields tokenspout does not know included."""

    model_config = ConfigDict(extra="allow", strict=True, use_attribute_docstrings=True)

    content: str | list[UpstreamContentPart] | None = None  # type: ignore[assignment]


class FunctionIn(StrictBody):
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr = ""
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}, "additionalProperties": False}
    )
    """A JSON schema for the arguments (an object); omitted means no arguments."""
    strict: StrictBool | None = None
    """Calls always conform to ``parameters``, strict or not; strict also closes its
    objects: one that does not set ``additionalProperties`` gets ``false``."""

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, parameters: dict[str, Any]) -> dict[str, Any]:
        # As OpenAI's API: a call's arguments are a JSON object, and an assistant message
        # that carries them is refused otherwise, so such a tool could never be answered.
        if parameters.get("type", "object") != "object":
            raise ValueError('must be the JSON schema of an object ("type": "object")')
        return parameters


class ToolIn(StrictBody):
    type: Literal["function"]
    function: FunctionIn


class NamedFunction(StrictBody):
    name: StrictStr


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(StrictBody):
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """Omitted means any JSON object."""
    strict: StrictBool | None = None
    """Output always conforms to the schema (constrained decoding), strict or not; strict
    also closes its objects: one that does not set ``additionalProperties`` gets ``false``
    (OpenAI refuses a strict schema without it; vLLM closes it too)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, populate_by_name=True, use_attribute_docstrings=True
    )


class ResponseFormatText(StrictBody):
    type: Literal["text"]


class ResponseFormatJsonObject(StrictBody):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(StrictBody):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class StructuredOutputs(StrictBody):
    """vLLM's ``structured_outputs``: exactly one constraint. Its other keys
    (``whitespace_pattern``, ``structural_tag``...) are not served: a 400 names them."""

    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    """A JSON schema (an object, or its JSON text)."""
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    """A grammar in llguidance's Lark syntax (not GBNF)."""
    json_object: StrictBool | None = None
    """true: any JSON object."""

    model_config = ConfigDict(
        extra="forbid", strict=True, populate_by_name=True, use_attribute_docstrings=True
    )


class _GenerationBody(StrictBody):
    """Fields shared by chat and completions."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0
    """Sample from the k most likely tokens; 0 or -1 (vLLM's) for all of them."""
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    """Choices to generate for the prompt (at most 8; the prompt is computed once). With
    a seed, choice i draws with seed + i (wrapping around the 64-bit range). Not resumable,
    and not over /v1/ws."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Drop tokens less likely than min_p times the most likely one (0: off)."""
    presence_penalty: Penalty = 0.0
    """Subtracted once from the logit of every token already in the output."""
    frequency_penalty: Penalty = 0.0
    """Subtracted from a token's logit once per occurrence in the output."""
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] = 1.0
    """vLLM's extension: > 1 discourages tokens already in the prompt or output."""
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                  Field(max_length=MAX_LOGIT_BIAS)] | None
    ) = None  # fmt: skip
    """Token id (as a string, as OpenAI spells it) -> bias in [-100, 100]."""
    response_format: ResponseFormat | None = None
    """json_object or json_schema: the output is constrained to valid JSON (conforming to
    the schema); a schema feature the grammar engine lacks is a 400."""
    guided_json: dict[str, Any] | StrictStr | None = None
    """vLLM's guided decoding extensions (at most one, and not with ``response_format``)."""
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    structured_outputs: StructuredOutputs | None = None
    """vLLM's newer form of the guided_* fields: one of json, regex, choice, grammar (Lark)
    or json_object."""
    user: StrictStr | None = None
    """Accepted for OpenAI compatibility (an end-user id); it does not change the output."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):  # "²".isdigit(), but int() refuses it
                raise ValueError(f"keys must be token ids, not {key!r}")
        return bias

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    """Return each output token's log-probability (after penalties and temperature)."""
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """With logprobs: this many most likely alternatives per token, sorted."""
    tools: Annotated[list[ToolIn], Field(max_length=128)] | None = None
    """Functions the model may call (one call per answer)."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """auto (default with tools), none, required or a named function; required and a
    named function are enforced by grammar."""
    parallel_tool_calls: StrictBool | None = None
    """One call per answer is generated whatever this says (see the README)."""
    add_generation_prompt: StrictBool = True
    """vLLM's extension: end the prompt with the template's generation prompt (a new
    assistant turn)."""
    continue_final_message: StrictBool = False
    """vLLM's extension: leave the final (assistant) message open and continue it; needs
    ``add_generation_prompt: false``."""
    store: StrictBool | None = None
    """Only false: tokenspout stores no completions (in front of an upstream, its call)."""
    metadata: dict[str, StrictStr] | None = None
    """Refused: nothing is stored to attach it to (in front of an upstream, its call)."""
    service_tier: StrictStr | None = None
    """auto or default: every request is served alike (in front of an upstream, its call)."""
    modalities: list[StrictStr] | None = None
    """Only ["text"]: the answer is text (in front of an upstream, its call)."""
    prediction: dict[str, Any] | None = None
    """Refused: predicted outputs are not served (in front of an upstream, its call)."""
    safety_identifier: StrictStr | None = None
    """Accepted for OpenAI compatibility (an end-user id, like ``user``); it does not change
    the output."""
    prompt_cache_key: StrictStr | None = None
    """Accepted for OpenAI compatibility; it does not change the output: prompt prefixes
    are cached automatically."""

    #: Content parts other than text are refused by name; an upstream reads them.
    text_parts_only: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _parts_the_model_reads(cls, data: Any) -> Any:
        return _text_parts_only(data) if cls.text_parts_only else data


class CompletionRequest(_GenerationBody):
    prompt: str | list[str]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # type: ignore[assignment]
    """0 only with echo: the prompt alone, scored (with logprobs)."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """The legacy form: the sampled token's logprob and this many alternatives."""
    echo: StrictBool = False
    """The text begins with the prompt; with logprobs, the prompt's tokens get theirs too
    (the first one null), as evaluation harnesses use for log-likelihoods."""
    best_of: PositiveInt | None = None
    """Only equal to ``n``: the n best of n candidates are all of them; more candidates
    than choices would need ranking on the server, which is not served."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, prompt: Any) -> Any:
        # vLLM's and OpenAI's other prompt forms, token ids: one message rather than
        # pydantic's mismatch with each member of the union.
        if isinstance(prompt, list) and any(isinstance(p, int | list) for p in prompt):
            raise InvalidRequestError(
                "token-id prompts are not supported: send the prompt as text", param="prompt"
            )
        return prompt

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt is supported (a string or a list of one string)")
        return prompt

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class UpstreamChatCompletionRequest(ChatCompletionRequest):
    """In front of other servers: fields tokenspout does not know are kept, for them, and
    messages go as sent."""

    model_config = ConfigDict(extra="allow", strict=True, use_attribute_docstrings=True)

    messages: list[UpstreamChatMessageIn] = Field(min_length=1)  # type: ignore[assignment]
    text_parts_only: ClassVar[bool] = False


class UpstreamCompletionRequest(CompletionRequest):
    """In front of other servers: fields tokenspout does not know are kept, for them."""

    model_config = ConfigDict(extra="allow", strict=True, use_attribute_docstrings=True)


def chat_schema(forwards_fields: bool) -> type[ChatCompletionRequest]:
    """The chat body's schema: strict, or keeping unknown fields for an upstream."""
    return UpstreamChatCompletionRequest if forwards_fields else ChatCompletionRequest


def completion_schema(forwards_fields: bool) -> type[CompletionRequest]:
    """The completions body's schema: strict, or keeping unknown fields for an upstream."""
    return UpstreamCompletionRequest if forwards_fields else CompletionRequest


class SeedStreamRequest(StrictBody):
    """The seed article's body: ``{"prompt": "...", "max_tokens": N}``."""

    prompt: str
    max_tokens: PositiveInt | None = None
    model: str | None = None
    temperature: Temperature = 1.0
    seed: Seed | None = None
    stream_options: SeedStreamOptions | None = None
    chat: StrictBool = False
    """The prompt is one user message, through the model's chat template (as a chat
    completion renders it), not text to continue: what a chat page's ``EventSource`` sends."""


class TokenizeRequest(StrictBody):
    """``POST /tokenize`` (vLLM's shape): a completion's ``prompt`` or a chat's
    ``messages`` (with ``tools``), as a generation request with them would send them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(default=None, min_length=1)
    tools: Annotated[list[ToolIn], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """none leaves the tools out of the prompt, as a chat completion does."""
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    """vLLM's: add the tokenizer's special tokens (a BOS) to the prompt. The ids are those
    a generation reads, which get none added: only false is served."""
    return_token_strs: StrictBool = False
    """Also each id's entry in the vocabulary, as the tokenizer spells it (``token_strs``)."""

    @model_validator(mode="before")
    @classmethod
    def _parts_the_model_reads(cls, data: Any) -> Any:
        return _text_parts_only(data)


class DetokenizeRequest(StrictBody):
    """``POST /detokenize`` (vLLM's shape): the text of ``tokens``."""

    model: str | None = None
    tokens: Annotated[list[StrictInt], Field(max_length=1 << 20)]
