"""Constrained decoding with llguidance: a request's ``Grammar`` as a per-row token mask.

llguidance (the grammar engine behind llama.cpp's and vLLM's guided decoding) compiles JSON
schemas, regexes and Lark grammars, and for each step computes the set of tokens that keep
the output inside the grammar (about 0.1 ms per row here). The sampler turns those sets into
``-inf`` logits for the constrained rows of a batch only, so constrained and free requests
share a step.

``check_grammar`` runs at admission, on the event loop, without a tokenizer: an unsupported
schema feature is a 400 before the request starts, never a failure mid-stream. Matchers are
built and advanced on the engine thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from tokenspout.engine.json_layout import JSON_OPTIONS
from tokenspout.engine.request import Grammar
from tokenspout.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch


def grammar_text(grammar: Grammar) -> str:
    """llguidance's grammar text for ``grammar`` (not yet validated)."""
    if grammar.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(grammar.source, overrides=JSON_OPTIONS)
    if grammar.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, overrides=JSON_OPTIONS
        )
    if grammar.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.source)
    if grammar.kind == "choice":
        # One lexeme, not a Lark alternation of literals: llguidance's Earley parser holds
        # at most 2,000 items in a row, which a list of 2,000 options overflowed at the first
        # token, past admission. A lexeme's alternatives cost the lexer, not the parser.
        options = "|".join(map(_regex_literal, json.loads(grammar.source)))
        return llguidance.LLMatcher.grammar_from_regex(options)
    return llguidance.LLMatcher.grammar_from_lark(grammar.source)


def _regex_literal(text: str) -> str:
    """A regex (Rust ``regex`` syntax, llguidance's) that matches ``text`` exactly: every
    character but a letter or digit as a ``\\x{...}`` escape, which has no meaning to
    escape in turn and no ``/`` to end the Lark literal llguidance writes the regex into."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


#: Integers a JSON schema may hold: llguidance takes a schema's numbers as 64-bit floats
#: (exact to 2^53) and its integers within 64 bits, so beyond that a ``const`` or a bound
#: moves (a bound of 10^19 became 2^63 - 1, under the minimum). The int64 limits themselves
#: are common values and come through exactly; as a bound, llguidance refuses int64's minimum
#: itself (it cannot build that range), with its own message.
_EXACT_INTEGERS = 2**53
_INT64_LIMITS = (2**63 - 1, -(2**63))
_VALUE_KEYWORDS = ("const", "enum", "default", "examples")
_BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _inexact_integer(value: Any) -> int | None:
    """An integer in ``value`` (a JSON value, searched through) that a schema's grammar
    would not hold exactly, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if abs(value) > _EXACT_INTEGERS and value not in _INT64_LIMITS else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((v for v in map(_inexact_integer, items) if v is not None), None)


def _check_integers(schema: Any, param: str) -> None:
    """Raise ``InvalidRequestError`` for an integer in ``schema``'s values or bounds that
    the grammar would round or clamp (it would then generate what the schema forbids)."""
    if isinstance(schema, list):
        for item in schema:
            _check_integers(item, param)
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in (*_VALUE_KEYWORDS, *_BOUND_KEYWORDS):
            number = _inexact_integer(value)
            if number is not None:
                raise InvalidRequestError(
                    f"{param}: {key} holds the integer {number}, beyond the +/-2^53 that "
                    "constrained decoding holds exactly",
                    param=param,
                )
        elif key not in ("properties", "patternProperties", "$defs", "definitions"):
            _check_integers(value, param)
        else:  # names of properties or definitions, each a schema
            for sub in value.values() if isinstance(value, dict) else ():
                _check_integers(sub, param)


def check_grammar(grammar: Grammar, param: str) -> None:
    """Raise ``InvalidRequestError`` naming ``param`` unless llguidance supports
    ``grammar`` (a schema keyword it does not implement, a look-around in a regex, an integer
    it would not hold exactly...)."""
    try:
        text = grammar_text(grammar)
    except ValueError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param) from None
    if grammar.kind == "json_schema":
        _check_integers(json.loads(grammar.source), param)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise InvalidRequestError(
            f"{param} is not supported for constrained decoding: {messages[0]}", param=param
        )


class TokenMasks:
    """The engine's llguidance state: the tokenizer it needs (built once, ~0.4 s and ~40 MB
    for SmolLM2's 49,152 tokens) and a mask buffer. Engine thread only."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
        )
        self.vocab_size = vocab_size
        #: One bit per token, 32 to an int32 word (llguidance's mask layout).
        self._words = (vocab_size + 31) // 32
        self._bitmask = np.empty((1, self._words), dtype=np.int32)

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; raises ``InvalidRequestError`` if the
        grammar does not compile against this tokenizer."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(grammar), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher

    def apply(
        self, logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[llguidance.LLMatcher]
    ) -> None:
        """Set to ``-inf`` the logits of ``rows`` (in place) that their matcher forbids;
        ``logits`` is a contiguous CPU float tensor."""
        if len(self._bitmask) < len(rows):
            self._bitmask = np.empty((len(rows), self._words), dtype=np.int32)
        bitmask = self._bitmask[: len(rows)]
        for i, matcher in enumerate(matchers):
            # What llguidance.torch.fill_next_token_bitmask does, without importing
            # torch.compile machinery (seconds of start-up) for it.
            matcher.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, bitmask[i].nbytes)
        # One bit per token, 32 to a little-endian int32 word, lowest bit first. Unpacked and
        # applied with numpy, in place through a view of the logits: measured here, torch's
        # shifts over [rows, words, 32] and masked_fill_ cost several times numpy's
        # single-pass unpackbits and putmask (~1.5 ms for 16 rows).
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        forbidden = np.zeros(logits.shape, dtype=np.bool_)
        forbidden[list(rows)] = bits[:, : logits.shape[-1]] == 0
        np.putmask(logits.numpy(), forbidden, -np.inf)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (for logprobs: a token may be part of a character)."""
        return self.tokenizer.decode_bytes([token_id])
