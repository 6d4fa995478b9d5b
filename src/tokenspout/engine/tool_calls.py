"""Function calling in a generic text format: the tools in the prompt, the grammar that
forces a well-formed call, and the parser that turns the output back into calls.

A model whose chat template renders ``tools`` itself gets them that way; any other model
(SmolLM2's template has no tools) gets them in a system message in the format below, the one
Hermes and Qwen2.5 templates use. Either way a call is generated as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the grammar fixes everything but the arguments' values, so the parser can stream the
name first and the arguments in pieces without guessing. With ``tool_choice: "auto"`` some
text may come first ("Let me check.\n" and a call), as Hermes and Qwen models write it: the
answer then has both content and the call, as OpenAI's and vLLM's do. One call per answer:
the grammar ends the output after ``</tool_call>``.
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
#: Text (Lark lexeme) that holds no call's opening tag: what auto's content may be.
_NO_TAG = r"/[\s\S]*/ & ~/[\s\S]*<tool_call>[\s\S]*/"
#: Text that ends with the start of the opening tag ("<", "<tool_", ...): a text answer may
#: not end so, which tells a call cut there by max_tokens from content.
_TAG_START = "/[\\s\\S]*(" + "|".join(OPEN[:n] for n in range(1, len(OPEN) - 1)) + ")/"
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
    """The output grammar for calls of ``tools``: ``"auto"`` (text, one call, or text and
    then one call; the text holds no ``<tool_call>`` of its own) or ``"required"`` (one
    call). A named ``tool_choice`` is ``"required"`` over that one tool: the mode is never
    read from a tool's name, which may well be ``"auto"``. ``answer``: under ``"auto"``, a
    JSON schema the text answer follows instead of free text (a ``response_format`` beside
    the tools, as OpenAI takes them): that answer or one call, never both."""
    rules = []
    for i, tool in enumerate(tools):
        head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
        rules.append(f"call{i}: {head} args{i} {json.dumps(CLOSE)}")
        rules.append(f"args{i}: %json {json_schema_lark(tool.parameters)}")
    calls = " | ".join(f"call{i}" for i in range(len(tools)))
    if mode == "auto" and answer is not None:
        # A JSON answer is whole by itself: it or a call. It holds no raw newline, so the
        # parser never reads a string in it as the call's opening "<tool_call>\n".
        start = "\n".join(
            [
                f"start: answer | {json.dumps(OPEN)} ({calls})",
                f"answer: %json {json_schema_lark(answer)}",
            ]
        )
    elif mode == "auto":
        # One lexeme for the text and the opening tag after it: the lexer, greedy, would
        # otherwise read on into "<tool_call" as text and fail at its ">".
        start = "\n".join(
            [
                f"start: TEXT | TEXT_THEN_OPEN ({calls})",
                f"TEXT: /[\\s\\S]+/ & {_NO_TAG} & ~{_TAG_START}",
                f"TEXT_THEN_OPEN: ({_NO_TAG}) {json.dumps(OPEN)}",
            ]
        )
    else:
        start = f"start: {json.dumps(OPEN)} ({calls})"
    return Grammar("lark", "\n".join([start, *rules]))


class ToolCallParser:
    """Splits a streamed output into content and ``ToolCallDelta`` pieces (engine thread).

    Content is sent as it comes, but for a tail that may be the start of ``<tool_call>``
    (``"... <tool_"``), and the whitespace before it, which wait for what follows. From
    ``<tool_call>`` on the output is a call: its name is sent once it is complete, then the
    arguments as they come, holding back what may be the closing ``}\n</tool_call>``. The
    whitespace between text and a call (the ``"\n"`` templates write there) is the
    markup's, not the content's. The markup itself is never content: the client asked for
    calls, not for this server's format of them.
    """

    def __init__(self) -> None:
        #: Before a call: what is held back; from its opening tag on: the call's text.
        self._buffer = ""
        self._in_call = False
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
        self._buffer += text
        if self._in_call:
            return "", self._pieces(final=False)
        start = self._buffer.find(OPEN)
        if start < 0:
            held = _held_back(self._buffer)
            content, self._buffer = self._buffer[:held], self._buffer[held:]
            return content, ()
        content, self._buffer = self._buffer[:start].rstrip(), self._buffer[start:]
        self._in_call = True
        return content, self._pieces(final=False)

    def finish(self, *, cut: bool) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """What is left at the end; ``cut``: ``max_tokens`` ended the output. A call cut
        short (by ``max_tokens`` or a stop string) ends with what it has: its name and its
        arguments' text so far (without the start of the closing markup that followed them),
        or nothing when it was cut before its name.

        Output held back as the start of ``<tool_call>`` (``"<tool_"``) is dropped when
        ``cut``, with the whitespace before it: what was to follow is unknown, and the
        grammar lets no text end that way (see ``grammar``), so it can only be the start of
        a call. Otherwise what followed is known and no call: a stop string (``"3 <"`` before
        the stop ``" 5"``) or stop token, which end the answer as they end one without tools,
        or the end of the text, which the grammar allows after no tag start. What is held
        back is then content, as whitespace held back alone always is.
        """
        if self._in_call:
            return "", self._pieces(final=True)
        rest, self._buffer = self._buffer, ""
        return ("", ()) if cut and rest.strip() else (rest, ())

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


def _held_back(text: str) -> int:
    """Where the tail of ``text`` that must wait begins: the start of ``<tool_call>`` it may
    end with, and the whitespace before that. ``"<"`` is the tag's first character and not
    in the rest of it, so only the last ``"<"`` can begin it."""
    held = len(text)
    tag = text.rfind("<")
    if tag >= 0 and OPEN.startswith(text[tag:]):
        held = tag
    while held and text[held - 1].isspace():
        held -= 1
    return held
