"""Function calling in a generic text format: the tools in the prompt, the grammar that
forces a well-formed call, and the parser that turns the output back into calls.

A model whose chat template renders ``tools`` itself gets them that way; any other model
(SmolLM2's template has no tools) gets them in a system message in the format below, the one
Hermes and Qwen2.5 templates use. Either way a call is generated as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the grammar fixes everything but the arguments' values, so the parser can stream the
name first and the arguments in pieces without guessing. One call per answer: the grammar
ends the output after ``</tool_call>``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tokenspout.engine.json_layout import json_schema_lark
from tokenspout.engine.request import ChatMessage, Grammar, ToolCall, ToolCallDelta

OPEN = "<tool_call>\n"
CLOSE = "}\n</tool_call>"
_NAME = re.compile(r'<tool_call>\n\{"name": "((?:[^"\\]|\\.)*)"')
#: What the grammar puts between the name and the arguments.
_ARGS_SEP = ', "arguments": '


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema for its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (``arguments``: JSON text)."""
    return f'{OPEN}{{"name": {json.dumps(name)}, "arguments": {arguments}{CLOSE}'


def system_prompt(tools: Sequence[Tool]) -> str:
    """The generic description of the tools, for a template that cannot render them."""
    lines = "\n".join(json.dumps(t.as_openai()) for t in tools)
    return (
        "You may call one of these functions to answer. Function signatures, in <tools>:\n"
        f"<tools>\n{lines}\n</tools>\n"
        "To call a function, reply with only a JSON object with the function's name and "
        "arguments inside <tool_call></tool_call> tags, like this:\n"
        + call_text("function_name", '{"argument": "value"}')
    )


def with_generic_tools(messages: Sequence[ChatMessage], tools: Sequence[Tool]) -> list[ChatMessage]:
    """``messages`` for a template without tool support: the tools' description added to the
    system message (or a new one), and earlier calls written out as the model writes them."""
    out = [
        replace(
            m,
            content="\n".join(
                [m.content, *(call_text(c.name, c.arguments) for c in m.tool_calls)]
            ).strip(),
            tool_calls=(),
        )
        if m.tool_calls
        else m
        for m in messages
    ]
    if not tools:
        return out
    prompt = system_prompt(tools)
    if out and out[0].role == "system":
        return [replace(out[0], content=f"{out[0].content}\n\n{prompt}"), *out[1:]]
    return [ChatMessage("system", prompt), *out]


def grammar(
    tools: Sequence[Tool],
    mode: Literal["auto", "required"],
    answer: dict[str, Any] | None = None,
) -> Grammar:
    """The output grammar for calls of ``tools``: ``"auto"`` (free text that does not start
    with ``<``, or one call) or ``"required"`` (one call). A named ``tool_choice`` is
    ``"required"`` over that one tool: the mode is never read from a tool's name, which may
    well be ``"auto"``. ``answer``: under ``"auto"``, a JSON schema the text answer follows
    instead of free text (a ``response_format`` beside the tools, as OpenAI takes them)."""
    rules = []
    for i, tool in enumerate(tools):
        head = json.dumps(f'{OPEN}{{"name": {json.dumps(tool.name)}, "arguments": ')
        rules.append(f"call{i}: {head} args{i} {json.dumps(CLOSE)}")
        rules.append(f"args{i}: %json {json_schema_lark(tool.parameters)}")
    calls = " | ".join(f"call{i}" for i in range(len(tools)))
    if mode == "auto" and answer is not None:
        # A JSON answer starts with a value, never with the call's "<".
        start = f"start: answer | {calls}\nanswer: %json {json_schema_lark(answer)}"
    elif mode == "auto":
        start = f"start: TEXT | {calls}\nTEXT: /[^<][\\s\\S]*/"
    else:
        start = f"start: {calls}"
    return Grammar("lark", "\n".join([start, *rules]))


class ToolCallParser:
    """Splits a streamed output into content and ``ToolCallDelta`` pieces (engine thread).

    Output that starts with ``<tool_call>`` is a call: its name is sent once it is complete,
    then the arguments as they come, holding back what may be the closing
    ``}\\n</tool_call>``. Anything else is content, sent as is. The markup itself is never
    content: the client asked for calls, not for this server's format of them.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._is_call: bool | None = None
        self._args_start: int | None = None
        self._args_sent = 0
        self.has_call = False

    @property
    def complete(self) -> bool:
        """Whether the call came whole, up to its closing ``</tool_call>`` (a call cut by a
        stop string or ``max_tokens`` is not)."""
        return self.has_call and self._buffer.endswith(CLOSE)

    def feed(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """Content and call pieces that ``text`` completes."""
        if self._is_call is False:
            return text, ()
        self._buffer += text
        if self._is_call is None:
            if OPEN.startswith(self._buffer):
                return "", ()
            self._is_call = self._buffer.startswith(OPEN)
            if not self._is_call:
                content, self._buffer = self._buffer, ""
                return content, ()
        return "", self._pieces(final=False)

    def finish(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """What is left at the end. A call cut short (by ``max_tokens`` or a stop string)
        ends with what it has: its name and its arguments' text so far (without the start of
        the closing markup that followed them), or nothing when it was cut before its name.

        Output held back as a prefix of ``<tool_call>`` (``"<tool_"``) is dropped, not
        returned as content, even with ``tool_choice: "auto"``: the grammar lets no text
        start with ``<`` (auto's text is ``[^<]...``), so such output can only be the start
        of a call that was cut. Output that went on to differ from ``<tool_call>`` was sent
        as content by ``feed`` already.
        """
        if not self._is_call:
            return "", ()
        return "", self._pieces(final=True)

    def _pieces(self, *, final: bool) -> tuple[ToolCallDelta, ...]:
        deltas = []
        if self._args_start is None:
            head = _NAME.match(self._buffer)
            if head is None:
                return ()
            # The grammar writes the separator after every name: the arguments start there
            # even before it has come.
            self._args_start = head.end() + len(_ARGS_SEP)
            self.has_call = True
            name = json.loads(f'"{head.group(1)}"')
            deltas.append(ToolCallDelta(0, f"call_{uuid.uuid4().hex[:24]}", name, ""))
        end = len(self._buffer)
        if not final or self._buffer.endswith(CLOSE):
            end -= len(CLOSE)
        elif self._args_start < end:
            # Cut after whole arguments, inside the markup that closes them ("}\n</tool"):
            # the arguments are the JSON value, not what came after it.
            try:
                _, length = json.JSONDecoder().raw_decode(self._buffer[self._args_start :])
            except ValueError:  # cut inside the arguments: all of it is theirs
                pass
            else:
                end = self._args_start + length
        start = self._args_start + self._args_sent
        if end > start:
            deltas.append(ToolCallDelta(0, None, None, self._buffer[start:end]))
            self._args_sent += end - start
        return tuple(deltas)


def merge_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """Whole calls from their pieces, by index."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, ["", "", ""])
        call[0] = d.id or call[0]
        call[1] = d.name or call[1]
        call[2] += d.arguments
    return [ToolCall(*calls[i]) for i in sorted(calls)]
