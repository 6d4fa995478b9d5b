"""The request fields beyond plain sampling, as engine inputs: structured output (OpenAI's
``response_format``, vLLM's ``guided_*``), tools, logprobs, penalties, ``min_p`` and
``logit_bias``. Conflicting fields are a 400 that names them; whether the serving engine can
honour the result is its ``check_params``'s call."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from tokenspout.engine import tool_calls
from tokenspout.engine.request import ChatMessage, Grammar, SamplingParams, ToolCall
from tokenspout.engine.tool_calls import Tool
from tokenspout.errors import InvalidRequestError
from tokenspout.server import strict_schema
from tokenspout.server.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseFormatText,
    StructuredOutputs,
    TokenizeRequest,
)


def chat_messages(
    body: ChatCompletionRequest | TokenizeRequest, forwarded: bool = False
) -> list[ChatMessage]:
    """The body's messages for an engine; ``forwarded``: each keeps its form as sent
    (``ChatMessage.sent``), for an engine that passes messages on to another server."""
    messages = [_message(m, f"messages[{i}]", forwarded) for i, m in enumerate(body.messages or ())]
    _check_tool_results(messages)
    return messages


def _message(m: ChatMessageIn, param: str, forwarded: bool) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
    if calls and m.role != "assistant":
        raise InvalidRequestError(
            f"only assistant messages carry tool_calls ({param} is {_a(m.role)} message)",
            param=f"{param}.tool_calls",
        )
    if m.tool_call_id is not None and m.role != "tool":
        raise InvalidRequestError(
            f"only tool messages carry tool_call_id ({param} is {_a(m.role)} message)",
            param=f"{param}.tool_call_id",
        )
    if m.role != "assistant":
        for name in m.ASSISTANT_ONLY:
            if getattr(m, name) is not None:
                raise InvalidRequestError(
                    f"only assistant messages carry {name} ({param} is {_a(m.role)} message)",
                    param=f"{param}.{name}",
                )
    if m.content is None and not calls and m.refusal is None:
        raise InvalidRequestError(
            f"{param} ({_a(m.role)} message) needs content", param=f"{param}.content"
        )
    # OpenAI's newer name for system instructions; engines and templates know only system.
    role = "system" if m.role == "developer" else m.role
    # A refusal without content (null, "" or no text parts: SDKs send each) is what the
    # assistant said; reasoning and annotations are not words of the conversation (vLLM's
    # templates drop reasoning from the history).
    text = m.text() or m.refusal or ""
    sent = None
    if forwarded:
        sent = {**m.model_dump(mode="json", by_alias=True, exclude_none=True), "role": role}
    return ChatMessage(role, text, calls, m.tool_call_id, m.name, sent)


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _check_tool_results(messages: list[ChatMessage]) -> None:
    """A tool message is the result of a call that an earlier assistant message made, named
    by its ``tool_call_id`` (OpenAI's rule): without one, or naming no call, the prompt would
    hold a result of nothing."""
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        call_ids.update(c.id for c in m.tool_calls)
        if m.role != "tool":
            continue
        param = f"messages[{i}].tool_call_id"
        if m.tool_call_id is None:
            raise InvalidRequestError(f"missing required parameter: '{param}'", param=param)
        if m.tool_call_id not in call_ids:
            raise InvalidRequestError(
                f"{param}: a tool message must be a response to a preceding assistant message "
                f"with tool_calls; none has a call with id {m.tool_call_id!r}",
                param=param,
            )


def chat_tools(body: ChatCompletionRequest | TokenizeRequest) -> list[Tool]:
    """The tools to render in the prompt: none with ``tool_choice: "none"`` (as vLLM's
    ``--exclude-tools-when-tool-choice-none``), where a model shown them writes calls that
    could only go out as text. A ``strict`` function's parameters are closed (no keys
    beyond those listed). ``InvalidRequestError`` for a ``tool_choice`` without tools, or
    naming none of them."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return []
    if choice == "none":
        return []
    tools = [
        Tool(
            t.function.name,
            t.function.description,
            strict_schema.closed(t.function.parameters)
            if t.function.strict
            else t.function.parameters,
        )
        for t in body.tools
    ]
    if isinstance(choice, NamedToolChoice) and all(t.name != choice.function.name for t in tools):
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not in tools",
            param="tool_choice",
        )
    return tools


def apply(
    params: SamplingParams, body: ChatCompletionRequest | CompletionRequest
) -> SamplingParams:
    """``params`` with the body's advanced fields (validated again by ``SamplingParams``)."""
    changes: dict[str, Any] = {
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "logit_bias": tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
        "logprobs": _logprobs(body),
        "grammar": _structured_output(body),
    }
    if isinstance(body, ChatCompletionRequest):
        tools_grammar = _tool_grammar(body, changes["grammar"])
        if tools_grammar is not None:
            changes["grammar"] = tools_grammar
            changes["tool_calls"] = True
            changes["named_tool"] = isinstance(body.tool_choice, NamedToolChoice)
    return replace(params, **changes)


def check_served(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse, saying why, the values of OpenAI's fields that ask for what this server does
    not do. Not for an engine that forwards fields: an upstream (a hosted API) may store
    completions, serve a tier or predicted outputs, and honours or refuses them itself."""
    if not isinstance(body, ChatCompletionRequest):
        return
    if body.store:
        raise InvalidRequestError(
            "tokenspout stores no completions: store can only be false", param="store"
        )
    if body.metadata is not None:
        raise InvalidRequestError(
            "tokenspout stores no completions to attach metadata to: leave metadata out",
            param="metadata",
        )
    if body.service_tier not in (None, "auto", "default"):
        raise InvalidRequestError(
            f"service_tier {body.service_tier!r} is not served: every request is served "
            'alike ("auto" or "default")',
            param="service_tier",
        )
    if body.modalities is not None and set(body.modalities) != {"text"}:
        raise InvalidRequestError(
            'the answer is text: modalities can only be ["text"]', param="modalities"
        )
    if body.prediction is not None:
        raise InvalidRequestError(
            "predicted outputs are not served: leave prediction out", param="prediction"
        )


def check_best_of(body: ChatCompletionRequest | CompletionRequest) -> None:
    """``best_of`` candidates of which the ``n`` best are returned: equal to ``n``, they are
    all returned, as any request's choices; more would need ranking, which is not served
    (here or upstream: each choice is a request of its own there); fewer is invalid."""
    if not isinstance(body, CompletionRequest) or body.best_of in (None, body.n):
        return
    if body.best_of < body.n:  # invalid for OpenAI and vLLM too
        raise InvalidRequestError(
            f"best_of ({body.best_of}) must be at least n ({body.n}): each choice returned "
            "is one of the candidates",
            param="best_of",
        )
    raise InvalidRequestError(
        f"best_of can only equal n ({body.n}): choosing the best of more candidates than "
        "the choices returned is not served",
        param="best_of",
    )


def check_text_only(params: SamplingParams) -> None:
    """For a transport that carries only text (the WebSocket API): refuse the fields whose
    answer is more than text."""
    if params.logprobs is not None:
        raise InvalidRequestError("logprobs are not available over /v1/ws", param="logprobs")
    if params.tool_calls:
        raise InvalidRequestError("tool calls are not available over /v1/ws", param="tools")


def _logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def _structured_output(body: ChatCompletionRequest | CompletionRequest) -> Grammar | None:
    fields = ("response_format", "guided_json", "guided_regex", "guided_choice")
    given = {
        name: value
        for name in (*fields, "structured_outputs")
        if (value := getattr(body, name)) is not None
    }
    if isinstance(given.get("response_format"), ResponseFormatText):
        del given["response_format"]  # no constraint
    if len(given) > 1:
        raise InvalidRequestError(
            f"give at most one of {', '.join(sorted(given))}", param=sorted(given)[1]
        )
    if not given:
        return None
    name, value = next(iter(given.items()))
    if isinstance(value, StructuredOutputs):
        return _structured_outputs(value)
    if isinstance(value, ResponseFormatJsonObject):
        return Grammar("json_object")
    if isinstance(value, ResponseFormatJsonSchema):
        schema = value.json_schema.schema_
        if schema is None:
            return Grammar("json_object")
        return _schema(strict_schema.closed(schema) if value.json_schema.strict else schema, name)
    if name == "guided_json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"guided_json is not JSON: {exc}", param=name) from None
    if name == "guided_json":
        return _schema(value, name)
    if name == "guided_regex":
        return Grammar("regex", value, param=name)
    return Grammar("choice", json.dumps(value), param=name)


def _structured_outputs(value: StructuredOutputs) -> Grammar:
    """vLLM's ``structured_outputs`` onto the same grammar kinds as ``guided_*``."""
    given = {
        key: v
        for key in ("json", "regex", "choice", "grammar", "json_object")
        if (v := getattr(value, "json_" if key == "json" else key)) is not None
    }
    if len(given) != 1:
        raise InvalidRequestError(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
            param="structured_outputs",
        )
    key, v = next(iter(given.items()))
    param = f"structured_outputs.{key}"
    if key == "json":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{param} is not JSON: {exc}", param=param) from None
        return _schema(v, param)
    if key == "json_object":
        if v is not True:
            raise InvalidRequestError(f"{param} must be true when given", param=param)
        return Grammar("json_object", param=param)
    if key == "choice":
        return Grammar("choice", json.dumps(v), param=param)
    return Grammar("regex" if key == "regex" else "lark", v, param=param)


def _schema(schema: Any, param: str) -> Grammar:
    if not isinstance(schema, dict):
        raise InvalidRequestError("the JSON schema must be an object", param=param)
    return Grammar("json_schema", json.dumps(schema), param=param)


def _tool_grammar(body: ChatCompletionRequest, answer: Grammar | None) -> Grammar | None:
    """The grammar of the tool-call output, or None when no call may be made. ``answer``:
    the format a text answer takes (``response_format``...), which ``tool_choice: "auto"``
    allows beside a call; ``"required"`` and a named function allow only the call, to
    which a text format does not apply (as in OpenAI's API)."""
    choice = body.tool_choice
    tools = chat_tools(body)  # refuses a tool_choice without tools, or naming none of them
    if not tools:
        return None
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.name == choice.function.name]
        return tool_calls.grammar(named, "required")
    if choice == "required":
        return tool_calls.grammar(tools, "required")
    return tool_calls.grammar(tools, "auto", _json_answer(answer))


def _json_answer(answer: Grammar | None) -> dict[str, Any] | None:
    """The JSON schema of a text answer given beside tools; only JSON formats combine with
    calls: a regex, a choice or a grammar could write the call's markup as text."""
    if answer is None:
        return None
    if answer.kind == "json_object":
        return {"type": "object"}
    if answer.kind == "json_schema":
        return dict(json.loads(answer.source))
    raise InvalidRequestError(
        'with tools (unless tool_choice is "none"), the answer\'s format can only be JSON: '
        "response_format json_object or json_schema, guided_json, or structured_outputs "
        "json or json_object",
        param=answer.param or "response_format",
    )
