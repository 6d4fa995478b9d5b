"""``POST /tokenize`` and ``/detokenize`` on the real default model: the ids a request's
prompt is to the model (as its usage counts them), the text of ids, and their refusals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, _start
from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.server.config import ServerConfig

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France? 東京は? 🙂"},
]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running, stop = _start(LLMEngine(None, max_num_seqs=2), ServerConfig())
    yield running
    stop()


def post(server: RunningServer, path: str, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)  # type: ignore[arg-type]


def test_the_count_is_what_a_request_with_the_prompt_is_charged(server: RunningServer) -> None:
    chat = post(server, "/tokenize", {"messages": CHAT}).json()
    assert chat["count"] == len(chat["tokens"]) and chat["max_model_len"] == 2048
    asked = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}).json()
    assert asked["usage"]["prompt_tokens"] == chat["count"]
    # Without the generation prompt, the template's last turn is left out.
    bare = post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    text = "Once upon a time, 東京 🙂"
    plain = post(server, "/tokenize", {"prompt": text}).json()
    asked = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1}).json()
    assert asked["usage"]["prompt_tokens"] == plain["count"]


def test_detokenize_gives_the_text_back(server: RunningServer) -> None:
    for body in ({"prompt": "Once upon a time, 東京 🙂"}, {"messages": CHAT}):
        tokens = post(server, "/tokenize", body).json()["tokens"]
        text = post(server, "/detokenize", {"tokens": tokens}).json()["prompt"]
        if "prompt" in body:
            assert text == body["prompt"]
        else:  # the template's text, special tokens written out
            assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
            assert text.endswith("<|im_start|>assistant\n") and "東京は? 🙂" in text


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/tokenize", {}, "prompt", "give a prompt or messages"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "messages", "not both"),
        ("/tokenize", {"prompt": "a", "tools": []}, "tools", "tools go with messages"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "add_special_tokens", "false"),
        ("/tokenize", {"prompt": "a", "best_of": 2}, "best_of", "Extra inputs"),
        ("/tokenize", {"messages": CHAT, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ("/detokenize", {"tokens": [1, 49152]}, "tokens", "tokens[1] is 49152"),
        ("/detokenize", {"tokens": ["1"]}, "tokens[0]", "tokens[0]: Input should be a valid int"),
    ],
)
def test_what_cannot_be_answered_is_a_400_naming_the_field(
    server: RunningServer, path: str, body: dict, param: str, says: str
) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_prompt_longer_than_the_context_is_counted(server: RunningServer) -> None:
    # As vLLM's: the client compares the count with max_model_len and cuts the prompt. It
    # was a 400 that gave the count but no ids to cut.
    text = "hello " * 3000
    counted = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert counted["count"] == 3001 and counted["count"] > counted["max_model_len"]
    asked = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1})
    assert asked.status_code == 400
    assert asked.json()["error"]["code"] == "context_length_exceeded"


def test_token_strs_are_the_vocabulary_entries(server: RunningServer) -> None:
    r = post(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == [19556, 905] and r["token_strs"] == ["Hello", "Ġworld"]


def test_a_tool_choice_is_checked_as_a_chat_completion_checks_it(server: RunningServer) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    named = {"type": "function", "function": {"name": "g"}}
    for path in ("/tokenize", "/v1/chat/completions"):
        r = post(server, path, {"messages": CHAT, "tools": tools, "tool_choice": named})
        assert r.status_code == 400 and "'g', which is not in tools" in r.text, (path, r.text)


def test_a_model_not_served_is_a_404(server: RunningServer) -> None:
    r = post(server, "/tokenize", {"model": "gpt-4", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_the_api_keys_guard_them_as_they_guard_v1(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "a"\nkey = "sk-a"\n\n'
        '[[keys]]\nname = "b"\nkey = "sk-b"\nmodels = ["another-model"]\n'
    )
    server = start_server(SyntheticEngine(), api_keys_file=str(keys))
    for path, body in (("/tokenize", {"prompt": "one two"}), ("/detokenize", {"tokens": [1]})):
        assert post(server, path, body).status_code == 401
        b = post(server, path, body, headers={"authorization": "Bearer sk-b"})
        assert b.status_code == 403, b.text
    a = post(server, "/tokenize", {"prompt": "one two"}, headers={"authorization": "Bearer sk-a"})
    assert a.json()["count"] == 2
    # The synthetic engine has no tokenizer to read ids with.
    r = post(server, "/detokenize", {"tokens": [1]}, headers={"authorization": "Bearer sk-a"})
    assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
