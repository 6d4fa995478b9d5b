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
from typing import TYPE_CHECKING

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
        # Lark string literals are JSON strings.
        options = " | ".join(json.dumps(c) for c in json.loads(grammar.source))
        return llguidance.LLMatcher.grammar_from_lark(f"start: {options}")
    return llguidance.LLMatcher.grammar_from_lark(grammar.source)


def check_grammar(grammar: Grammar, param: str) -> None:
    """Raise ``InvalidRequestError`` naming ``param`` unless llguidance supports
    ``grammar`` (a schema keyword it does not implement, a look-around in a regex...)."""
    try:
        text = grammar_text(grammar)
    except ValueError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param) from None
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
