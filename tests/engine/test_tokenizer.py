"""Tokenizer of the default GGUF against ids stored by scripts/make_reference_greedy.py.

The stored ids come from transformers' tokenizer given SmolLM2's pre-tokenizer, cross-checked
there with an independent pure-Python BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.request import ChatMessage
from tokenspout.engine.tokenizer import CHATML_TEMPLATE, GIL_FREE_CHARS, Tokenizer
from tokenspout.errors import InvalidRequestError, ModelLoadError

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_tokenizer.json").read_text())


@pytest.fixture(scope="module")
def meta() -> dict:
    return ModelFiles.resolve(None).metadata()["tokenizer"]


@pytest.fixture(scope="module")
def tokenizer(meta: dict) -> Tokenizer:
    return Tokenizer.from_metadata(meta)


@pytest.mark.parametrize("case", REFERENCE["texts"], ids=lambda c: repr(c["text"][:24]))
def test_encode_matches_reference(tokenizer: Tokenizer, case: dict) -> None:
    assert tokenizer.encode(case["text"]) == case["ids"]


def test_a_long_text_encodes_as_the_library_encodes_it(tokenizer: Tokenizer) -> None:
    # From GIL_FREE_CHARS on, encode makes another call of the library (one that lets other
    # threads run while it works): the ids are the same.
    text = "\n".join(case["text"] for case in REFERENCE["texts"])
    long = (text + "\n") * (GIL_FREE_CHARS // len(text) + 1)
    assert len(long) >= GIL_FREE_CHARS
    assert tokenizer.encode(long) == tokenizer._backend.encode(long).ids


@pytest.mark.parametrize("case", REFERENCE["texts"], ids=lambda c: repr(c["text"][:24]))
def test_decode_round_trips(tokenizer: Tokenizer, case: dict) -> None:
    assert tokenizer.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_decode_skips_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids) == "user\nhi"


def test_cut_multibyte_character_decodes_to_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # byte-level: the emoji spans several tokens
    assert tokenizer.decode(ids[:1]) == "\ufffd"


@pytest.mark.parametrize("case", REFERENCE["chats"], ids=["one-turn", "multi-turn"])
def test_chat_template_matches_reference(tokenizer: Tokenizer, case: dict) -> None:
    messages = [ChatMessage(m["role"], m["content"]) for m in case["messages"]]
    text = tokenizer.render_chat(messages)
    assert text == case["text"]
    assert tokenizer.encode(text) == case["ids"]


def test_chat_without_generation_prompt(tokenizer: Tokenizer) -> None:
    text = tokenizer.render_chat([ChatMessage("user", "hi")], add_generation_prompt=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_special_ids(tokenizer: Tokenizer) -> None:
    # SmolLM2-Instruct: EOS is <|im_end|> (2), which is also its end-of-turn token.
    assert tokenizer.eos_token_ids == frozenset({2})
    assert tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size == 49152
    # add_bos_token is false in the file, so even add_special_tokens adds nothing.
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")


def test_add_bos_when_metadata_asks(meta: dict) -> None:
    tokenizer = Tokenizer.from_metadata({**meta, "add_bos_token": True})
    assert tokenizer.encode("hi", add_special_tokens=True) == [1, *tokenizer.encode("hi")]


def test_chatml_fallback_without_template(meta: dict) -> None:
    tokenizer = Tokenizer.from_metadata({**meta, "chat_template": None})
    assert tokenizer.chat_template == CHATML_TEMPLATE
    text = tokenizer.render_chat([ChatMessage("user", "hi")])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_raise_exception_is_a_bad_request(meta: dict) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    tokenizer = Tokenizer.from_metadata({**meta, "chat_template": template})
    with pytest.raises(InvalidRequestError, match="user first"):
        tokenizer.render_chat([ChatMessage("assistant", "hi")])


def test_template_strftime_now(meta: dict) -> None:
    tokenizer = Tokenizer.from_metadata({**meta, "chat_template": "{{ strftime_now('%Y') }}"})
    assert tokenizer.render_chat([]).isdigit()


def test_template_cannot_reach_python_internals(meta: dict) -> None:
    template = "{{ messages.__class__.__mro__ }}"
    tokenizer = Tokenizer.from_metadata({**meta, "chat_template": template})
    with pytest.raises(Exception, match=r"unsafe|not safely"):
        tokenizer.render_chat([ChatMessage("user", "hi")])


def test_unsupported_tokenizer_model(meta: dict) -> None:
    with pytest.raises(ModelLoadError, match="byte-level BPE"):
        Tokenizer.from_metadata({**meta, "model": "llama"})


def test_unsupported_pre_tokenizer(meta: dict) -> None:
    with pytest.raises(ModelLoadError, match="pre-tokenizer"):
        Tokenizer.from_metadata({**meta, "pre": "mystery"})


def test_from_directory(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer._backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "chat_template": CHATML_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_directory(tmp_path)
    for case in REFERENCE["texts"]:
        assert loaded.encode(case["text"]) == case["ids"]
    assert loaded.eos_token_ids == frozenset({2})
    assert loaded.bos_token_id == 1


@pytest.mark.parametrize("so_far", ["The sky", "", "hi <|im_end|> and hi"])
def test_continue_final_message_ends_with_its_content(tokenizer: Tokenizer, so_far: str) -> None:
    # What the model saw before the cut, followed by the text so far: no end of turn after
    # it, whatever the content holds (an empty answer, text equal to an earlier message).
    asked = [ChatMessage("system", "hi"), ChatMessage("user", "Why is the sky blue?")]
    continued = tokenizer.render_chat(
        [*asked, ChatMessage("assistant", so_far)],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert continued == tokenizer.render_chat(asked) + so_far
