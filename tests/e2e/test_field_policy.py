"""OpenAI's newer fields against the policy: one we can honour, even trivially, is accepted
and changes nothing; one we cannot is a 400 that names it and says why, never accepted and
ignored. In front of an upstream, the fields it may honour (a hosted API stores, serves
tiers) go there as sent."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import RunningServer
from tests.upstream_processes import faulty, front, processes

CHAT = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "red green blue"}]})
COMPLETION = ("/v1/completions", {"prompt": "red green blue "})
CACHED = {"type": "text", "text": "red green blue", "cache_control": {"type": "ephemeral"}}


def answer(server: RunningServer, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json={**body, "max_tokens": 5, "seed": 1})
    assert r.status_code == 200, r.text
    answered = r.json()
    return {"choices": answered["choices"], "usage": answered["usage"]}


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (CHAT, {"store": False}),
        (CHAT, {"service_tier": "auto"}),
        (CHAT, {"service_tier": "default"}),
        (CHAT, {"modalities": ["text"]}),
        (CHAT, {"safety_identifier": "user-1", "prompt_cache_key": "conversation-7"}),
        (CHAT, {"messages": [{"role": "user", "content": [CACHED]}]}),
        (CHAT, {"stream": True, "stream_options": {"include_obfuscation": False}}),
        (COMPLETION, {"best_of": 1}),
        (COMPLETION, {"best_of": 2, "n": 2}),
    ],
    ids=["store false", "service_tier auto", "service_tier default", "modalities text",
         "safety_identifier, prompt_cache_key", "cache_control", "include_obfuscation false",
         "best_of 1", "best_of n"],
)  # fmt: skip
def test_a_field_honoured_trivially_is_accepted_and_changes_nothing(
    synthetic_server: RunningServer, kind: tuple[str, dict], fields: dict
) -> None:
    path, body = kind
    if fields.get("stream"):
        r = httpx.post(f"{synthetic_server.url}{path}", json={**body, **fields, "max_tokens": 5})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        return
    plain = answer(synthetic_server, path, {**body, "n": fields.get("n", 1)})
    assert answer(synthetic_server, path, {**body, **fields}) == plain


@pytest.mark.parametrize(
    ("kind", "fields", "param", "why"),
    [
        (CHAT, {"store": True}, "store", "stores no completions"),
        (CHAT, {"metadata": {}}, "metadata", "stores no completions to attach metadata to"),
        (CHAT, {"metadata": {"a": "b"}}, "metadata", "stores no completions"),
        (CHAT, {"service_tier": "flex"}, "service_tier", "'flex' is not served"),
        (CHAT, {"modalities": ["text", "audio"]}, "modalities", "the answer is text"),
        (CHAT, {"prediction": {"type": "content", "content": "hi"}}, "prediction",
         "predicted outputs are not served"),
        (CHAT, {"stream": True, "stream_options": {"include_obfuscation": True}},
         "stream_options.include_obfuscation", "no obfuscation padding"),
        (COMPLETION, {"best_of": 2}, "best_of", "best_of can only equal n (1)"),
        # It was refused as choosing "the best of more candidates" than returned: fewer.
        (COMPLETION, {"best_of": 1, "n": 2}, "best_of", "best_of (1) must be at least n (2)"),
    ],
    ids=["store true", "metadata {}", "metadata", "service_tier flex", "modalities audio",
         "prediction", "include_obfuscation true", "best_of 2", "best_of below n"],
)  # fmt: skip
def test_a_field_that_cannot_be_honoured_is_a_400_that_names_it_and_says_why(
    synthetic_server: RunningServer, kind: tuple[str, dict], fields: dict, param: str, why: str
) -> None:
    path, body = kind
    r = httpx.post(f"{synthetic_server.url}{path}", json={**body, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and why in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_in_front_of_an_upstream_its_fields_go_there_as_sent(
    start_server: Callable[..., RunningServer],
) -> None:
    """A hosted API may store completions, serve a tier or predicted outputs: they are its
    to honour or refuse. best_of is not sent: each of n choices is a request of its own."""
    fields = {"store": True, "metadata": {"a": "b"}, "service_tier": "flex",
              "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
              "safety_identifier": "u", "prompt_cache_key": "k"}  # fmt: skip
    with processes(faulty) as (upstream,):
        server = front(start_server, upstream)
        path, body = CHAT
        r = httpx.post(f"{server.url}{path}", json={**body, **fields, "model": "synthetic"})
        assert r.status_code == 200, r.text
        sent = upstream.stats()["body"]
        assert {k: sent[k] for k in fields} == fields
        path, body = COMPLETION
        r = httpx.post(f"{server.url}{path}", json={**body, "best_of": 1, "model": "synthetic"})
        assert r.status_code == 200, r.text
        assert "best_of" not in upstream.stats()["body"]
        r = httpx.post(f"{server.url}{path}", json={**body, "best_of": 3, "model": "synthetic"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text
