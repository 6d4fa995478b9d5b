"""Detokenizer: no broken characters, no leaked stop strings, deltas add up to the text.

Table-driven with a fake byte-level tokenizer (each token is a few raw bytes, as in
byte-level BPE); the real SmolLM2 tokenizer is exercised in test_llm_engine.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tokenspout.engine.detokenizer import Detokenizer
from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.tokenizer import Tokenizer


class ByteTokenizer:
    """Token ids are indexes into a table of byte strings, as a byte-level BPE has."""

    def __init__(self) -> None:
        self.table: list[bytes] = []

    def ids(self, *pieces: bytes) -> list[int]:
        out = []
        for piece in pieces:
            if piece not in self.table:
                self.table.append(piece)
            out.append(self.table.index(piece))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")


def split_bytes(text: str, sizes: Sequence[int]) -> list[bytes]:
    """Cut ``text``'s UTF-8 bytes into pieces of the given sizes (the rest in the last)."""
    raw, pieces, at = text.encode(), [], 0
    for n in sizes:
        pieces.append(raw[at : at + n])
        at += n
    return [*pieces, raw[at:]] if at < len(raw) else pieces


def run(pieces: Sequence[bytes], stop: Sequence[str] = ()) -> tuple[list[str], Detokenizer]:
    tok = ByteTokenizer()
    d = Detokenizer(tok.decode, stop)
    deltas = []
    for i in tok.ids(*pieces):
        deltas.append(d.add(i))
        if d.finish_reason:
            break
    deltas.append(d.flush())
    return deltas, d


# (name, pieces, stop strings, expected deltas including the final flush, final text, finish).
# A token ending inside a character holds back its whole decode window, like vLLM does.
CASES = [
    ("ascii", [b"Hel", b"lo", b" world"], (), ["Hel", "lo", " world", ""], "Hello world", None),
    (
        "emoji split in 4",
        split_bytes("a🐉b", [2, 1, 1, 1]),
        (),
        ["", "", "", "a🐉", "b", ""],
        "a🐉b",
        None,
    ),
    (
        "japanese split mid-character",
        split_bytes("日本", [2, 2]),
        (),
        ["", "", "日本", ""],
        "日本",
        None,
    ),
    ("accent split", split_bytes("café", [4, 1]), (), ["", "café", ""], "café", None),
    ("stop inside one token", [b"Hi", b" END", b" more"], ("END",), ["Hi", " ", ""], "Hi ", "stop"),
    (
        "stop split across tokens",
        [b"ab", b"<|", b"st", b"op|>", b"zz"],
        ("<|stop|>",),
        ["ab", "", "", "", ""],
        "ab",
        "stop",
    ),
    (
        "false alarm is released",
        [b"ab", b"<|", b"x"],
        ("<|stop|>",),
        ["ab", "", "<|x", ""],
        "ab<|x",
        None,
    ),
    (
        "held tail released at flush",
        [b"ab", b"<|st"],
        ("<|stop|>",),
        ["ab", "", "<|st"],
        "ab<|st",
        None,
    ),
    ("earliest of two stops wins", [b"x", b"BBAA"], ("AA", "BB"), ["x", "", ""], "x", "stop"),
    (
        "stop across an emoji",
        split_bytes("ok🐉!", [2, 2, 2, 1]),
        ("🐉!",),
        ["ok", "", "", "", ""],
        "ok",
        "stop",
    ),
    ("cut character at the end is dropped", [b"a", b"\xf0\x9f"], (), ["a", "", ""], "a", None),
]


@pytest.mark.parametrize(
    ("pieces", "stop", "deltas", "text", "finish"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_deltas(
    pieces: list[bytes], stop: tuple[str, ...], deltas: list[str], text: str, finish: str | None
) -> None:
    got, d = run(pieces, stop)
    assert got == deltas
    assert d.text == text == "".join(got)
    assert d.finish_reason == finish
    assert all("\ufffd" not in g for g in got[:-1])


@pytest.mark.parametrize("text", ["Hello, world!", "🐉⚔️ 騎士とドラゴン", "naïve café", "x" * 50])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_concatenated_deltas_equal_a_full_decode(text: str, size: int) -> None:
    raw = text.encode()
    pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
    got, d = run(pieces)
    assert "".join(got) == d.text == text
    assert all("\ufffd" not in g for g in got)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        Detokenizer(lambda ids: "", stop=("",))


# --- the real SmolLM2 tokenizer: emoji and CJK characters span several tokens ---


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_metadata(ModelFiles.resolve(None).metadata()["tokenizer"])


@pytest.mark.parametrize(
    "text",
    [
        "🐉 The dragon 🐲 met the knight ⚔️.",
        "騎士とドラゴンは友達になった。",
        "naïve café, crème brûlée, Ærøskøbing",
        "mixed: 日本語 and emoji 👍🏽 and more",
    ],
)
def test_real_tokenizer_never_emits_a_broken_character(smollm2: Tokenizer, text: str) -> None:
    d = Detokenizer(smollm2.decode)
    deltas = [d.add(i) for i in smollm2.encode(text)] + [d.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == d.text == text


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Once upon a time<|stop|> the end", "<|stop|>", "Once upon a time"),
        ("The knight said: THE END. More words", "THE END", "The knight said: "),
        ("dragons 🐉🐉 fly", "🐉🐉", "dragons "),
        ("騎士とドラゴン", "ドラ", "騎士と"),
    ],
)
def test_real_tokenizer_stop_strings_split_across_tokens(
    smollm2: Tokenizer, text: str, stop: str, expected: str
) -> None:
    d = Detokenizer(smollm2.decode, stop=(stop,))
    deltas = []
    for i in smollm2.encode(text):
        deltas.append(d.add(i))
        if d.finish_reason:
            break
    deltas.append(d.flush())
    assert d.finish_reason == "stop"
    assert "".join(deltas) == d.text == expected
    assert not any(stop[:2] in delta for delta in deltas)
