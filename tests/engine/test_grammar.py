"""Grammars as llguidance runs them, against the real tokenizer: ``guided_choice`` lists."""

from __future__ import annotations

import json

import llguidance
import pytest

from tokenspout.engine.grammar import check_grammar, grammar_text
from tokenspout.engine.request import Grammar
from tokenspout.engine.tokenizer import Tokenizer


def accepts(tokens: tuple[Tokenizer, llguidance.LLTokenizer], g: Grammar, text: str) -> bool:
    """Whether ``g`` takes ``text`` (as the tokenizer encodes it) as a whole answer."""
    tok, ll = tokens
    matcher = llguidance.LLMatcher(ll, grammar_text(g), log_level=0)
    ok = matcher.consume_tokens(tok.encode(text, add_special_tokens=False))
    return ok and not matcher.is_error() and matcher.is_accepting()


def choice(options: list[str]) -> Grammar:
    grammar = Grammar("choice", json.dumps(options), param="guided_choice")
    check_grammar(grammar, "guided_choice")
    return grammar


def test_a_choice_of_thousands_of_options_is_served(lltokenizer) -> None:  # type: ignore[no-untyped-def]
    # As a Lark alternation, 2,000 options overflowed llguidance's Earley row at the first
    # token ("Current row has 2001 items"), after admission had passed the grammar.
    options = [f"opt{i}" for i in range(5000)]
    grammar = choice(options)
    for option in ("opt0", "opt1999", "opt2000", "opt4999"):
        assert accepts(lltokenizer, grammar, option)
    assert not accepts(lltokenizer, grammar, "opt5000")
    assert not accepts(lltokenizer, grammar, "opt")


@pytest.mark.parametrize(
    "options",
    [
        ['a"b', "c\\d", "a/b", "/", "\\", "\\x{41}"],
        ["tab\there", "nl\nthere", "\r\n", "\u2028x", "\x00"],
        ["😀 yes", "日本", "é", "e\u0301"],
        [".*", "(x|y)", "[^]", "{1}", "$^", "a+?", "#&~-", "''", " "],
        ["a", "ab", "abc", ""],  # prefixes of each other: each one an answer
    ],
)
def test_choice_options_are_taken_literally(lltokenizer, options: list[str]) -> None:  # type: ignore[no-untyped-def]
    grammar = choice(options)
    for option in options:
        assert accepts(lltokenizer, grammar, option), option
    for other in ("x", "a.b", "A", "abcd", "nl there"):
        if other not in options:
            assert not accepts(lltokenizer, grammar, other), other
