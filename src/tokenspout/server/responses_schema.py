"""The body of ``POST /v1/responses`` (OpenAI's Responses API), strict as the chat body is:
a wrong type or an unknown field is a 400 that names it, and so is a field of that API this
server does not serve (``previous_response_id``, ``store: true``, ``reasoning``...): never
accepted and ignored. The README's table lists what is served."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tokenspout.errors import InvalidRequestError
from tokenspout.server.schemas import (
    FlushMs,
    FunctionIn,
    JsonSchemaFormat,
    PositiveInt,
    StrictBody,
    Temperature,
    TopP,
    json_object_text,
    refuse_unread_parts,
)

#: OpenAI's metadata: up to 16 pairs, keys of up to 64 characters, values of up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[StrictStr, Field(max_length=512)]],
    Field(max_length=16),
]

#: Why each field of the API that is not served is refused.
_NOT_SERVED = {
    "previous_response_id": "this server stores no responses; send the whole conversation in input",
    "conversation": "this server stores no conversations; send the whole conversation in input",
    "reasoning": "the models served here do not reason on request",
    "prompt": "this server stores no prompt templates",
}


class InputText(StrictBody):
    type: Literal["input_text"]
    text: StrictStr


class OutputText(StrictBody):
    """Text of an earlier answer, as the API returned it (sent back as input)."""

    type: Literal["output_text"]
    text: StrictStr
    annotations: list[Any] | None = None
    """Returned with the answer; not read."""
    logprobs: list[Any] | None = None
    """Returned with the answer; not read."""


class OutputRefusal(StrictBody):
    """A refusal of an earlier answer, as the API returned it (sent back as input)."""

    type: Literal["refusal"]
    refusal: StrictStr


#: A message's text parts. An image, file or audio part is refused by name
#: (``_refuse_what_input_cannot_carry``).
ContentPart = Annotated[InputText | OutputText | OutputRefusal, Field(discriminator="type")]


class MessageItem(StrictBody):
    """A message, with or without ``type: "message"`` (the API's "easy" form)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[ContentPart]
    id: StrictStr | None = None
    """An earlier answer's item id, when it is sent back; not read."""
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    """An earlier answer's item status, when it is sent back; not read."""

    def text(self) -> str | None:
        """The text parts' text; None for a refusal alone (the answer had no text)."""
        if isinstance(self.content, str):
            return self.content
        texts = [part.text for part in self.content if not isinstance(part, OutputRefusal)]
        # One text per part, a line apart, as chat's parts are joined.
        return "\n".join(texts) if texts or self.refusal() is None else None

    def refusal(self) -> str | None:
        """The refusal parts' text, if the message has any (an earlier answer's)."""
        if isinstance(self.content, str):
            return None
        refusals = [part.refusal for part in self.content if isinstance(part, OutputRefusal)]
        return "\n".join(refusals) if refusals else None


class FunctionCallItem(StrictBody):
    """A call an earlier answer made (its ``function_call`` output item)."""

    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    """A JSON object, as text."""
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        return json_object_text(arguments)


class FunctionCallOutputItem(StrictBody):
    """The result of a call, for the answer that follows it."""

    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningText(StrictBody):
    type: Literal["reasoning_text"]
    text: StrictStr


class SummaryText(StrictBody):
    type: Literal["summary_text"]
    text: StrictStr


class ReasoningItem(StrictBody):
    """An earlier answer's reasoning (its ``reasoning`` output item, sent back): never
    rendered in the prompt, as chat's reasoning is not; in front of an upstream its
    ``content`` goes there as the assistant message's ``reasoning_content``. It must be
    followed by what it led to (an assistant message or a ``function_call``), as OpenAI
    requires."""

    type: Literal["reasoning"]
    id: StrictStr | None = None
    summary: list[SummaryText] | None = None
    """A summary of what ``content`` holds: not read."""
    content: list[ReasoningText] | None = None
    encrypted_content: StrictStr | None = None
    """Only null: this server encrypts no reasoning, and cannot read another's."""
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("encrypted_content")
    @classmethod
    def _not_encrypted(cls, encrypted: str) -> str:
        raise ValueError("not served: this server encrypts no reasoning and cannot read another's")

    def text(self) -> str:
        return "\n".join(part.text for part in self.content or ())


def _item_type(item: Any) -> str | None:
    """An input item's tag: its ``type``; a message may leave it out."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionIn):
    """Responses' flat function tool: ``{"type": "function", "name", "description",
    "parameters", "strict"}``. ``strict`` defaults to true, as in OpenAI's Responses API."""

    type: Literal["function"]
    strict: StrictBool | None = None


class TextFormatText(StrictBody):
    type: Literal["text"]


class TextFormatJsonObject(StrictBody):
    type: Literal["json_object"]


class TextFormatJsonSchema(JsonSchemaFormat):
    """Responses' flat ``json_schema`` format (chat nests the same fields one level down)."""

    type: Literal["json_schema"]


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextConfig(StrictBody):
    format: TextFormat | None = None


class NamedFunctionChoice(StrictBody):
    type: Literal["function"]
    name: StrictStr


class ResponsesStreamOptions(StrictBody):
    """OpenAI's Responses ``stream_options`` plus tokenspout's coalescing knobs, as chat's
    ``stream_options`` has them. No ``include_usage`` (the last event always carries the
    usage) and no ``resumable`` (a Responses stream never is)."""

    include_obfuscation: StrictBool = False
    """No obfuscation padding is added to the events, so only false is served."""
    flush_tokens: PositiveInt | None = None
    flush_ms: FlushMs | None = None


#: The content parts a message's ``content`` list may hold (``ContentPart``).
_TEXT_PARTS = frozenset({"input_text", "output_text", "refusal"})


_WHY_TEXT_ONLY = {
    False: "the model reads text only (input_text, output_text and refusal parts)",
    # A Responses request becomes a chat request of text messages for the upstream.
    True: "/v1/responses sends an upstream text only (input_text, output_text and refusal "
    "parts); /v1/chat/completions sends it image_url, input_audio and file parts as given",
}


def _refuse_what_input_cannot_carry(data: Any, forwards_fields: bool) -> Any:
    """Refuse an image, file or audio content part, or a ``function_call_output`` whose
    ``output`` is a list of parts, in one message that names the place (``input[0].content[1]``),
    rather than pydantic's mismatch with each member of ``input``'s unions."""
    items = data.get("input") if isinstance(data, dict) else None
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = _item_type(item)
        if kind == "function_call_output" and isinstance(item.get("output"), list):
            param = f"input[{i}].output"
            raise InvalidRequestError(
                f"{param}: a function_call_output's output can only be a string here: a list "
                "of content parts is not supported (send the result's text)",
                param=param,
            )
        content = item.get("content") if kind == "message" else None
        refuse_unread_parts(content, f"input[{i}]", _TEXT_PARTS, _WHY_TEXT_ONLY[forwards_fields])
    return data


class ResponsesRequest(StrictBody):
    """``POST /v1/responses``."""

    #: Whether the server is in front of an upstream (``UpstreamResponsesRequest``): its
    #: refusals of image, file and audio input say where such input could go.
    forwards_fields: ClassVar[bool] = False

    model: str | None = None
    input: StrictStr | Annotated[list[InputItem], Field(min_length=1)]
    """A user message, or a list of messages, ``function_call`` items,
    ``function_call_output`` items and ``reasoning`` items: the whole conversation (nothing
    is stored here)."""
    instructions: StrictStr | None = None
    """A system message before the input."""
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stream: StrictBool = False
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    """Function tools only (one call per answer), as chat's tools."""
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    text: TextConfig | None = None
    """``format``: text, json_object or json_schema (constrained decoding), as chat's
    ``response_format``."""
    parallel_tool_calls: StrictBool | None = None
    """One call per answer is generated whatever this says."""
    user: StrictStr | None = None
    """An end-user id; it does not change the output."""
    safety_identifier: StrictStr | None = None
    """An end-user id, like ``user``; it does not change the output."""
    prompt_cache_key: StrictStr | None = None
    """It does not change the output: prompt prefixes are cached automatically."""
    service_tier: StrictStr | None = None
    """auto or default: every request is served alike (in front of an upstream, its call)."""
    stream_options: ResponsesStreamOptions | None = None
    """With ``stream: true`` only, as chat's."""
    truncation: Literal["disabled"] | None = None
    """Only ``disabled``: a prompt longer than the context is a 400."""
    store: StrictBool | None = None
    """Only false: nothing is stored (omitted: not stored)."""
    background: StrictBool | None = None
    """Only false: a response is generated while its request waits."""
    include: list[Any] | None = None
    """Only empty: nothing more can be included."""
    previous_response_id: Any = None
    """Not served (a 400): nothing is stored; send the conversation in ``input``."""
    conversation: Any = None
    """Not served (a 400): nothing is stored; send the conversation in ``input``."""
    reasoning: Any = None
    """Not served (a 400): the models served here do not reason on request."""
    metadata: Metadata | None = None
    """Echoed in the response object, as OpenAI's (nothing is stored to attach it to)."""
    prompt: Any = None
    """Not served (a 400): no prompt templates are stored here."""

    @model_validator(mode="before")
    @classmethod
    def _input_it_can_carry(cls, data: Any) -> Any:
        return _refuse_what_input_cannot_carry(data, cls.forwards_fields)

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}] is {kind!r}: only function tools are served")
        return tools

    @field_validator("store")
    @classmethod
    def _not_stored(cls, store: bool) -> bool:
        if store:
            raise ValueError("only false is served: this server stores no responses")
        return store

    @field_validator("background")
    @classmethod
    def _not_background(cls, background: bool) -> bool:
        if background:
            raise ValueError("only false is served: responses are not generated in background")
        return background

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, include: list[Any]) -> list[Any]:
        if include:
            raise ValueError("only an empty list is served: nothing more can be included")
        return include

    @field_validator(*_NOT_SERVED)
    @classmethod
    def _not_served(cls, value: Any, info: ValidationInfo) -> Any:
        # Reached only for a value: null is a field not given.
        assert info.field_name is not None
        raise ValueError(f"not served: {_NOT_SERVED[info.field_name]}")


class UpstreamResponsesRequest(ResponsesRequest):
    """In front of other servers: the same body (it becomes a chat request for them)."""

    forwards_fields: ClassVar[bool] = True


def responses_schema(forwards_fields: bool) -> type[ResponsesRequest]:
    """The Responses body's schema: its refusals of non-text input differ upstream."""
    return UpstreamResponsesRequest if forwards_fields else ResponsesRequest
