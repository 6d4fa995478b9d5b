"""Fixtures shared by the engine tests."""

from __future__ import annotations

import llguidance
import pytest

from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lltokenizer() -> tuple[Tokenizer, llguidance.LLTokenizer]:
    """The default model's tokenizer, and llguidance's view of it (to run grammars)."""
    tok = Tokenizer.from_metadata(ModelFiles.resolve(None).metadata()["tokenizer"])
    ll = llguidance.LLTokenizer(
        tok.backend_json(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids)
    )
    return tok, ll
