"""The generic tool-call format: the parser at every split point, the grammar against the
real tokenizer (llguidance), and how tools reach a template without tool support."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch

from tokenspout.engine.grammar import TokenMasks, check_grammar, grammar_text
from tokenspout.engine.request import ChatMessage, Grammar, SamplingParams, ToolCall
from tokenspout.engine.tokenizer import Tokenizer
from tokenspout.engine.tool_calls import (
    Tool,
    ToolCallParser,
    call_text,
    grammar,
    merge_calls,
    with_generic_tools,
)
from tokenspout.errors import InvalidRequestError
from tokenspout.server import advanced_params
from tokenspout.server.schemas import ChatCompletionRequest

WEATHER = Tool(
    "get_weather",
    "weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALL = call_text("get_weather", '{"city": "Pa\\"ris"}')


def feed_in_pieces(text: str, size: int, *, cut: bool = True) -> tuple[str, list]:
    """Content and call pieces of ``text`` fed ``size`` characters at a time; ``cut``:
    ``max_tokens`` ended it (else a stop string or the end of the text did)."""
    parser = ToolCallParser()
    content, deltas = "", []
    for i in range(0, len(text), size):
        c, d = parser.feed(text[i : i + size])
        content, deltas = content + c, deltas + list(d)
    c, d = parser.finish(cut=cut)
    return content + c, deltas + list(d)


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_a_call_parses_whole_at_any_split_with_the_name_first(size: int) -> None:
    content, deltas = feed_in_pieces(CALL, size)
    assert content == ""
    assert deltas[0].name == "get_weather" and deltas[0].id and deltas[0].arguments == ""
    assert all(d.name is None and d.id is None for d in deltas[1:])
    (call,) = merge_calls(deltas)
    assert json.loads(call.arguments) == {"city": 'Pa"ris'}


@pytest.mark.parametrize("text", ["Hello <b>there</b>", "<to be or not>", "Sunny."])
def test_text_that_is_not_a_call_is_content(text: str) -> None:
    for size in (1, 3, 100):
        assert feed_in_pieces(text, size) == (text, [])


@pytest.mark.parametrize(
    "cut", ["<", "<tool_", "<tool_call>", "<tool_call>\n", '<tool_call>\n{"name": "get_wea']
)
def test_a_call_cut_before_its_name_ends_leaves_nothing(cut: str) -> None:
    # max_tokens cut it: the server's markup is not an answer, whatever the tool_choice.
    for size in (1, 3, 100):
        assert feed_in_pieces(cut, size) == ("", [])


@pytest.mark.parametrize(
    ("cut", "arguments"),
    [
        ('<tool_call>\n{"name": "get_weather"', ""),
        ('<tool_call>\n{"name": "get_weather", "argu', ""),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city":', '{"city":'),
        # cut after whole arguments, inside the closing markup: that markup is not theirs
        (CALL[:-12], '{"city": "Pa\\"ris"}'),
        (CALL[:-6], '{"city": "Pa\\"ris"}'),
        (CALL[:-13], '{"city": "Pa\\"ris"}'),
        # cut right after them: whole, but no call's end
        (CALL[:-14], '{"city": "Pa\\"ris"}'),
        (CALL[:-15], '{"city": "Pa\\"ris"'),
    ],
)
def test_a_call_cut_after_its_name_is_a_call_with_the_arguments_so_far(
    cut: str, arguments: str
) -> None:
    for size in (1, 3, 100):
        content, deltas = feed_in_pieces(cut, size)
        assert content == ""
        assert merge_calls(deltas) == [ToolCall(deltas[0].id or "", "get_weather", arguments)]


def test_only_a_call_up_to_its_closing_markup_is_complete() -> None:
    # A stop string or max_tokens that cuts a call leaves it incomplete, and the answer's
    # finish_reason is then not "tool_calls".
    for text, complete in ((CALL, True), (CALL[:-1], False), (CALL[:-14], False), ("Hi", False)):
        parser = ToolCallParser()
        parser.feed(text)
        parser.finish(cut=False)
        assert parser.complete is complete, text


def test_the_name_is_sent_as_soon_as_it_is_complete() -> None:
    parser = ToolCallParser()
    assert parser.feed('<tool_call>\n{"name": "get_weather') == ("", ())
    _, (first,) = parser.feed('"')
    assert first.name == "get_weather" and first.arguments == "" and parser.has_call


@pytest.mark.parametrize("gap", ["", "\n", "\n\n", " \n"])
@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_text_then_a_call_is_content_and_the_call(size: int, gap: str) -> None:
    # The text before a call came back with the call's markup as its content: only output
    # that started with "<tool_call>" was read as a call.
    content, deltas = feed_in_pieces(f"Let me check <b>that</b>.{gap}{CALL}", size)
    assert content == "Let me check <b>that</b>."  # the gap before the call is its markup's
    assert deltas[0].name == "get_weather" and deltas[0].id
    (call,) = merge_calls(deltas)
    assert json.loads(call.arguments) == {"city": 'Pa"ris'}


def test_content_before_a_call_is_sent_as_it_comes_but_what_may_open_the_call() -> None:
    parser = ToolCallParser()
    assert parser.feed("Let me") == ("Let me", ())
    assert parser.feed(" check <") == (" check", ())
    assert parser.feed("b> first.\n") == (" <b> first.", ())
    assert parser.feed("\n<tool_") == ("", ())
    assert parser.feed("call>\n") == ("", ())
    _, (first,) = parser.feed('{"name": "get_weather"')
    assert first.name == "get_weather" and parser.has_call
    parser.feed(CALL.removeprefix('<tool_call>\n{"name": "get_weather"'))
    assert parser.finish(cut=False) == ("", ()) and parser.complete


@pytest.mark.parametrize(
    "text", ["a <tool y", "see <tool_calls> here", "x <tool_call\ny", "<<tool_call", "1 <\n 2"]
)
def test_the_start_of_the_tag_in_prose_is_content(text: str) -> None:
    for size in (1, 3, 100):
        assert feed_in_pieces(f"{text}.", size) == (f"{text}.", [])


@pytest.mark.parametrize("cut", ["<", "<tool_cal", "<tool_call>", '<tool_call>\n{"name": "ge'])
def test_text_then_a_call_cut_before_its_name_is_the_text(cut: str) -> None:
    # max_tokens cut it: the text is content, the start of the markup is not.
    for size in (1, 3, 100):
        assert feed_in_pieces(f"Let me check.\n{cut}", size) == ("Let me check.", [])


@pytest.mark.parametrize("text", ["3 <", "3 <tool_", "Let me check.\n<tool_call", "a \n"])
def test_text_a_stop_string_ends_is_content_even_if_a_tag_could_follow(text: str) -> None:
    # "Is 3 < 5?" with stop " 5" gave "3 <" without tools and "3" with them: the held "<"
    # was dropped as a call's start, though what followed it (the stop string) is known.
    for size in (1, 3, 100):
        assert feed_in_pieces(text, size, cut=False) == (text, [])


def test_whitespace_held_back_ends_an_answer_without_a_call() -> None:
    for cut in (True, False):
        for size in (1, 3, 100):
            assert feed_in_pieces("Sunny.\n\n", size, cut=cut) == ("Sunny.\n\n", [])
        parser = ToolCallParser()
        assert parser.feed("Sunny.\n") == ("Sunny.", ())
        assert parser.finish(cut=cut) == ("\n", ()) and not parser.complete


def accepts(tokens: tuple[Tokenizer, llguidance.LLTokenizer], g: Grammar, text: str) -> bool:
    tok, ll = tokens
    matcher = llguidance.LLMatcher(ll, grammar_text(g))
    return matcher.consume_tokens(tok.encode(text)) and matcher.is_accepting()


def test_grammars_accept_calls_and_only_calls_when_required(lltokenizer) -> None:  # type: ignore[no-untyped-def]
    other = Tool("get_time", "time", {"type": "object"})
    required = grammar([WEATHER, other], "required")
    assert accepts(lltokenizer, required, call_text("get_weather", '{"city": "Paris"}'))
    assert accepts(lltokenizer, required, call_text("get_time", "{}"))
    assert not accepts(lltokenizer, required, "Sunny.")
    assert not accepts(lltokenizer, required, call_text("get_weather", '{"town": 1}'))
    auto = grammar([WEATHER], "auto")
    assert accepts(lltokenizer, auto, "Sunny.")
    assert accepts(lltokenizer, auto, call_text("get_weather", '{"city": "Paris"}'))


@pytest.mark.parametrize("gap", ["", " ", "\n", "\n\n"])
def test_auto_takes_text_then_a_call(lltokenizer, gap: str) -> None:  # type: ignore[no-untyped-def]
    # Auto's text was any output not starting with "<": text and then a call's markup,
    # valid or not, was all text.
    auto = grammar([WEATHER], "auto")
    paris = call_text("get_weather", '{"city": "Paris"}')
    assert accepts(lltokenizer, auto, f"Let me check.{gap}{paris}")
    assert accepts(lltokenizer, auto, f"<b>Hi</b> a <tool x <tool_calls{gap}{paris}")


@pytest.mark.parametrize(
    "text",
    [
        "Hi <tool_call>",
        "Hi <tool_call> and more.",
        'Hi <tool_call>\n{"name": "sunny", "arguments": {}}\n</tool_call>',
        'Hi\n<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>',
        call_text("get_weather", '{"city": "Paris"}') + " Done.",
        # a text answer may not end as a call starts: that is read as a call cut short
        "Hi <",
        "Hi <tool_cal",
    ],
)
def test_auto_refuses_the_tag_but_in_a_valid_call(lltokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    assert not accepts(lltokenizer, grammar([WEATHER], "auto"), text)


def test_an_answer_format_beside_tools_shapes_the_text_and_leaves_the_calls(lltokenizer) -> None:  # type: ignore[no-untyped-def]
    # OpenAI takes response_format and tools together: the answer is a call, or text in the
    # format. It was a 400.
    schema = {"type": "object", "properties": {"temp": {"type": "integer"}}, "required": ["temp"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER.parameters},
    }

    def grammar_of(**fields: object) -> Grammar:
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool], **fields}
        params = advanced_params.apply(SamplingParams(), ChatCompletionRequest.model_validate(body))
        assert params.grammar is not None and params.tool_calls
        return params.grammar

    auto = grammar_of(response_format=fmt)
    assert accepts(lltokenizer, auto, '{"temp": 21}')
    assert accepts(lltokenizer, auto, call_text("get_weather", '{"city": "Paris"}'))
    assert not accepts(lltokenizer, auto, "Sunny.")
    assert not accepts(lltokenizer, auto, '{"temp": "warm"}')
    # the format's answer or a call, not both
    paris = call_text("get_weather", '{"city": "Paris"}')
    assert not accepts(lltokenizer, auto, '{"temp": 21}' + paris)
    assert not accepts(lltokenizer, auto, "Sunny." + paris)
    assert accepts(lltokenizer, grammar_of(guided_json=schema), '{"temp": 21}')
    assert accepts(lltokenizer, grammar_of(response_format={"type": "json_object"}), '{"a": 1}')
    required = grammar_of(response_format=fmt, tool_choice="required")
    assert accepts(lltokenizer, required, call_text("get_weather", '{"city": "Paris"}'))
    assert not accepts(lltokenizer, required, '{"temp": 21}')
    for other in ({"guided_regex": "<.*"}, {"guided_choice": ["<tool_call>"]}):
        with pytest.raises(InvalidRequestError) as err:
            grammar_of(**other)
        assert err.value.param == next(iter(other))


@pytest.mark.parametrize("name", ["auto", "required", "get_time"])
def test_a_named_tool_choice_calls_that_tool_whatever_its_name(lltokenizer, name: str) -> None:  # type: ignore[no-untyped-def]
    # A function named "auto" let free text through, one named "required" any tool's call:
    # the name was read as the mode.
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in (name, "get_weather")
    ]
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": name}},
        }
    )
    named = advanced_params.apply(SamplingParams(), body).grammar
    assert named is not None
    assert accepts(lltokenizer, named, call_text(name, "{}"))
    assert not accepts(lltokenizer, named, call_text("get_weather", "{}"))
    assert not accepts(lltokenizer, named, "Sunny.")


def test_unsupported_schema_features_are_refused_naming_the_field() -> None:
    bad = Grammar("json_schema", json.dumps({"type": "string", "pattern": "(?=a)b"}))
    with pytest.raises(InvalidRequestError) as err:
        check_grammar(bad, "response_format")
    assert err.value.param == "response_format"
    check_grammar(Grammar("json_schema", json.dumps({"type": "object"})), "response_format")


def test_tools_and_earlier_calls_are_written_into_the_messages() -> None:
    messages = [
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "", (ToolCall("c1", "get_weather", '{"city": "Oslo"}'),)),
        ChatMessage("tool", "rain", tool_call_id="c1"),
    ]
    out = with_generic_tools(messages, [WEATHER])
    assert out[0].role == "system" and '"name": "get_weather"' in out[0].content
    assert out[2].content == call_text("get_weather", '{"city": "Oslo"}')
    assert out[2].tool_calls == () and out[3] == messages[2]


def test_token_masks_forbid_only_the_constrained_rows_tokens(lltokenizer) -> None:  # type: ignore[no-untyped-def]
    tok, _ = lltokenizer
    masks = TokenMasks(tok.backend_json(), tok.vocab_size, tok.eos_token_ids)
    matcher = masks.matcher(Grammar("choice", json.dumps(["yes", "no"])))
    logits = torch.zeros(3, tok.vocab_size)
    masks.apply(logits, [1], [matcher])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    assert torch.equal(logits[0], torch.zeros(tok.vocab_size))
    assert torch.equal(logits[2], torch.zeros(tok.vocab_size))


@pytest.mark.parametrize(
    "schema",
    [
        {"const": 2**53 + 1},
        {"enum": [1, 2**64 + 1]},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 10**19}}},
        {"$defs": {"x": {"maximum": -(2**60)}}, "$ref": "#/$defs/x"},
        {"items": {"enum": [{"a": [3 * 10**20]}]}, "type": "array"},
    ],
)
def test_integers_a_schema_grammar_would_not_hold_exactly_are_refused(schema: dict) -> None:
    # llguidance reads a schema's numbers as 64-bit floats and clamps integers to 64 bits:
    # a minimum of 10^19 let 2^63 - 1 through, a const of 2^53 + 1 came out as 2^53.
    with pytest.raises(InvalidRequestError, match="integer") as error:
        check_grammar(Grammar("json_schema", json.dumps(schema)), "response_format")
    assert error.value.param == "response_format"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer", "maximum": 2**63 - 1},  # int64's own limit
        {"enum": [2**53, -(2**53), 1.5e300]},
        {"type": "object", "properties": {"const": {"type": "integer"}}},  # a property's name
    ],
)
def test_integers_within_what_a_grammar_holds_are_taken(schema: dict) -> None:
    check_grammar(Grammar("json_schema", json.dumps(schema)), "response_format")
