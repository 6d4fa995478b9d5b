"""Text <-> token ids and the chat template, for a GGUF file or a Hugging Face directory.

A GGUF carries no ``tokenizer.json``, only llama.cpp's description of it (vocabulary,
merges, token types and a ``tokenizer.ggml.pre`` name for the pre-tokenizer). We rebuild
the Hugging Face tokenizer from that with the ``tokenizers`` library: byte-level BPE, the
pre-tokenizer the name stands for, control tokens as special added tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tokenspout.engine.request import ChatMessage
from tokenspout.errors import InvalidRequestError, ModelLoadError

#: From this length on, ``encode`` goes through ``encode_batch``, which lets go of the GIL
#: while it works (``encode`` holds it: 100,000 characters for ~50 ms), so that the event loop
#: goes on while a worker thread encodes a long prompt (``generation_request``).
GIL_FREE_CHARS = 4096

# Used when a model has no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# End-of-turn markers of common chat templates; a model stops on these as on its EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_CONTROL = 3  # llama.cpp token type for control tokens such as <|im_start|>
_USER_DEFINED = 4
# Stands in for the content of a message to be continued; no conversation contains it.
_CONTINUE_MARK = "\x00tokenspout-continue\x00"

# The regexes that llama.cpp's ``tokenizer.ggml.pre`` names stand for (llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizers whose tokenizer.json is Sequence[Digits(individual), ByteLevel(gpt2 regex)].
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r"})


class Tokenizer:
    """Encode, decode and render chat templates for one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
    ):
        self._backend = backend
        self._add_bos = add_bos and bos_token_id is not None
        self.bos_token_id = bos_token_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template or CHATML_TEMPLATE
        eos = {eos_token_id} if eos_token_id is not None else set()
        for marker in _END_OF_TURN:
            token_id = backend.token_to_id(marker)
            if token_id is not None and marker in self.chat_template:
                eos.add(token_id)
        #: Ids that end a generation: the model's EOS and its template's end-of-turn token.
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self._bos_text = self._token_text(bos_token_id)
        self._eos_text = self._token_text(eos_token_id)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(self.chat_template)
        #: The template renders a ``tools`` list itself (otherwise callers describe tools
        #: in a message: ``tool_calls.with_generic_tools``).
        self.renders_tools = "tools" in self.chat_template

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from the ``tokenizer`` part of ``ModelFiles.metadata()`` (a GGUF's)."""
        if meta["model"] != "gpt2":
            raise ModelLoadError(
                f"tokenizer model {meta['model']!r} is not supported; expected a byte-level BPE "
                "('gpt2') vocabulary"
            )
        tokens: list[str] = meta["tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = _pre_tokenizer(meta["pre"])
        backend.decoder = decoders.ByteLevel()
        types = meta["token_type"] or []
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, y in zip(tokens, types, strict=True)
                if y == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, y in zip(tokens, types, strict=True)
                if y == _USER_DEFINED
            ]
        )
        return cls(
            backend,
            bos_token_id=meta["bos_token_id"],
            eos_token_id=meta["eos_token_id"],
            add_bos=meta["add_bos_token"],
            chat_template=meta["chat_template"],
        )

    @classmethod
    def from_directory(cls, path: Path) -> Tokenizer:
        """Build from a Hugging Face directory (``tokenizer.json``, ``tokenizer_config.json``)."""
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # a list of named templates; take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # BOS comes from tokenizer.json's own post-processor, so we never add one by hand.
        return cls(
            backend,
            bos_token_id=_special_id(backend, config.get("bos_token")),
            eos_token_id=_special_id(backend, config.get("eos_token")),
            add_bos=False,
            chat_template=template,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids.

        With ``add_special_tokens``, BOS is prepended when the model's metadata asks for it.
        """
        if len(text) >= GIL_FREE_CHARS:
            ids = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos:
            assert self.bos_token_id is not None
            ids.insert(0, self.bos_token_id)
        return ids

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each id's entry in the vocabulary, as the tokenizer spells it (``Ġworld``)."""
        return [self._backend.id_to_token(i) or "" for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; a cut multi-byte character decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The Hugging Face tokenizer as ``tokenizer.json`` text (for llguidance)."""
        return self._backend.to_str()

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] = (),
        continue_final_message: bool = False,
    ) -> str:
        """The model's chat template applied to ``messages`` (and ``tools``, objects with
        ``as_openai()``, when ``renders_tools``). With ``continue_final_message`` the text
        ends with the final message's content, without the end-of-turn marks the template
        puts after it, so that the model continues that message."""
        if not continue_final_message:
            return self._render(messages, add_generation_prompt, tools)
        # Rendered with a marker in place of the final content and cut at the marker: the
        # template may wrap or trim a message's content, and the content may well occur
        # earlier in the conversation, so searching for the content itself is not safe.
        *before, final = messages
        marked = [*before, replace(final, content=_CONTINUE_MARK)]
        text = self._render(marked, False, tools)
        cut = text.rfind(_CONTINUE_MARK)
        if cut < 0:
            raise InvalidRequestError(
                "this model's chat template does not render the final message's content, "
                "so it cannot be continued",
                param="continue_final_message",
            )
        return text[:cut] + final.content

    def _render(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, tools: Sequence[Any]
    ) -> str:
        try:
            return self._template.render(
                messages=[_message_dict(m) for m in messages],
                tools=[t.as_openai() for t in tools] or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_text,
                eos_token=self._eos_text,
            )
        except TemplateError as exc:
            # raise_exception() in a template reports a bad conversation, not a server fault.
            raise InvalidRequestError(f"chat template: {exc}", param="messages") from exc

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._backend.id_to_token(token_id) or "")


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it (OpenAI's shape, arguments as an object)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.loads(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if name in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(name)
    if split is None:
        raise ModelLoadError(f"GGUF pre-tokenizer {name!r} is not supported")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
    )


def _special_id(backend: HFTokenizer, token: str | dict[str, Any] | None) -> int | None:
    if isinstance(token, dict):  # tokenizer_config.json may spell an AddedToken as a dict
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
