"""A Responses API request as the chat completion it asks for.

``POST /v1/responses`` is served by the chat machinery: its ``input`` items become chat
messages (``instructions`` a system message first, ``function_call`` items an assistant
message's ``tool_calls``, ``reasoning`` items its ``reasoning_content``, a message's
``refusal`` parts its ``refusal``,
``function_call_output`` items tool messages), its flat tools and
``text.format`` chat's nested ``tools`` and ``response_format``. The chat body carries only
the fields the client set, so that an upstream is sent what was asked, as for a chat request;
its validation (limits, tools, grammar) is chat's, and an error it raises names the
Responses field (``responses_params``). What the response object echoes of the request
(``settings``) comes from here too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tokenspout.errors import InvalidRequestError, TokenspoutError
from tokenspout.server.request_parsing import validate
from tokenspout.server.responses_schema import (
    FunctionCallItem,
    FunctionTool,
    MessageItem,
    NamedFunctionChoice,
    ReasoningItem,
    ResponsesRequest,
    TextFormatJsonSchema,
)
from tokenspout.server.schemas import ChatCompletionRequest

#: Fields chat has under the same name and meaning.
_SAME_IN_CHAT = (
    "model", "temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier",
    "prompt_cache_key", "service_tier",
)  # fmt: skip


def as_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request ``body`` asks for, with only the fields it set."""
    given = body.model_fields_set
    chat: dict[str, Any] = {"messages": _messages(body), "stream": body.stream}
    for name in _SAME_IN_CHAT:
        if name in given:
            chat[name] = getattr(body, name)
    if body.stream_options is not None:
        chat["stream_options"] = body.stream_options.model_dump(exclude_unset=True)
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    if body.tools is not None:
        chat["tools"] = [{"type": "function", "function": _function(t)} for t in body.tools]
    if body.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    if body.text is not None and body.text.format is not None:
        chat["response_format"] = _response_format(body.text.format)
    return validate(ChatCompletionRequest, chat)


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Chat messages; a ``function_call_output`` must answer an earlier ``function_call``
    (as a tool message must in chat), and a ``reasoning`` item lead to an assistant message
    or a ``function_call`` (as OpenAI requires), checked here to name the input item at
    fault. A reasoning item opens the assistant message of what follows it, as its
    ``reasoning_content``: chat's field, which is never rendered in the prompt and goes to
    an upstream as given."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    calls: set[str] = set()
    # The input index of a reasoning item not yet followed by what it led to.
    reasoning: int | None = None
    for i, item in enumerate(body.input):
        led_to = isinstance(item, FunctionCallItem) or (
            isinstance(item, MessageItem) and item.role == "assistant"
        )
        if reasoning is not None and not (led_to or isinstance(item, ReasoningItem)):
            _lone_reasoning(reasoning)
        if isinstance(item, ReasoningItem):
            if reasoning is None:
                messages.append({"role": "assistant", "content": None})
            if item.text():
                thought = messages[-1].get("reasoning_content")
                messages[-1]["reasoning_content"] = "\n".join(filter(None, (thought, item.text())))
            reasoning = i
        elif isinstance(item, MessageItem):
            message = {"role": item.role, "content": item.text()}
            if (refusal := item.refusal()) is not None:
                # Chat's field: rendered as the assistant's words when there is no text.
                message["refusal"] = refusal
            if reasoning is not None:
                messages[-1].update(message)
            else:
                messages.append(message)
        elif isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # The calls an answer made after its text (or reasoning), or beside each other.
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if item.call_id not in calls:
                param = f"input[{i}].call_id"
                raise InvalidRequestError(
                    f"{param}: a function_call_output must answer an earlier function_call "
                    f"item; none has call_id {item.call_id!r}",
                    param=param,
                )
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        if led_to:
            reasoning = None
    if reasoning is not None:
        _lone_reasoning(reasoning)
    return messages


def _lone_reasoning(index: int) -> None:
    """A reasoning item followed by nothing it led to: the assistant message it would go
    with has neither content nor calls."""
    param = f"input[{index}]"
    raise InvalidRequestError(
        f"{param}: a reasoning item must be followed by the assistant message or "
        "function_call it led to",
        param=param,
    )


def _function(tool: FunctionTool) -> dict[str, Any]:
    function = tool.model_dump(exclude={"type"}, exclude_unset=True)
    # OpenAI's Responses API makes function tools strict unless told otherwise.
    function["strict"] = _strict(tool)
    return function


def _strict(tool: FunctionTool) -> bool:
    return tool.strict is None or tool.strict


def _tool_choice(choice: str | NamedFunctionChoice) -> Any:
    if isinstance(choice, NamedFunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _response_format(fmt: Any) -> dict[str, Any]:
    if isinstance(fmt, TextFormatJsonSchema):
        schema = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_unset=True)
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.type}


def settings(body: ResponsesRequest) -> dict[str, Any]:
    """What a response object echoes of the request, as OpenAI's does (defaults filled in;
    what is not served has its one served value)."""
    tools = [
        {
            "type": "function",
            "name": t.name,
            "description": t.description or None,
            "parameters": t.parameters,
            "strict": _strict(t),
        }
        for t in body.tools or ()
    ]
    choice: Any = body.tool_choice or "auto"
    if isinstance(choice, NamedFunctionChoice):
        choice = choice.model_dump()
    fmt: dict[str, Any] = {"type": "text"}
    if body.text is not None and body.text.format is not None:
        fmt = body.text.format.model_dump(by_alias=True, exclude_unset=True)
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tool_choice": choice,
        "tools": tools,
        "text": {"format": fmt},
        "truncation": "disabled",
        "user": body.user,
        "store": False,
        "background": False,
        "previous_response_id": None,
        "reasoning": None,
        "metadata": body.metadata or {},
    }


#: A chat field named by an error, and the Responses field it came from. A message's
#: index is left out: instructions and merged calls shift it from the input item's.
_RENAMED = (
    ("messages", "input"),
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
)


@contextmanager
def responses_params() -> Iterator[None]:
    """An error raised inside (by chat's validation of ``as_chat``'s request) names the
    Responses field, not the chat one it was converted to."""
    try:
        yield
    except TokenspoutError as err:
        _rename(err)
        raise


def responses_error(err: TokenspoutError) -> TokenspoutError:
    """``err``, raised for the chat request a Responses request became (an upstream's
    refusal of it), as that request's client is told it: naming the Responses field."""
    told = copy.copy(err)
    _rename(told)
    return told


def _rename(err: TokenspoutError) -> None:
    for chat, responses in _RENAMED:
        param = err.param or ""
        if param == chat or param.startswith((f"{chat}.", f"{chat}[")):
            rest = "" if chat == "messages" else param[len(chat) :]
            err.param = responses + rest
            err.message = err.message.replace(chat, responses)
            return
