"""Conversations on the page: each request carries the history, the conversation survives
a reload of the tab (sessionStorage), Regenerate replaces the last answer, New conversation
starts over."""

from __future__ import annotations

import json

import pytest

from tokenspout.engine.synthetic_engine import SyntheticEngine

pytestmark = pytest.mark.browser


def chat_requests(page) -> list[list[dict]]:  # type: ignore[no-untyped-def]
    """The messages of every chat request the page sends from now on."""
    sent: list[list[dict]] = []
    page.on(
        "request",
        lambda r: (
            sent.append(json.loads(r.post_data)["messages"])
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    return sent


def say(page, prompt: str) -> str:  # type: ignore[no-untyped-def]
    """Send ``prompt`` as the user and wait for the answer; the answer's status line."""
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#send:not([disabled])")
    return page.locator('[data-kind="streamed"] .status').last.text_content() or ""


def test_history_regenerate_and_new_conversation(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=2))
    context = browser.new_context()
    page = context.new_page()
    sent = chat_requests(page)

    try:
        page.goto(server.url)
        page.fill("#max-tokens", "3")
        assert page.locator("#regenerate").is_disabled()
        say(page, "alpha")
        say(page, "beta gamma")
        first_answer = "alpha alpha alpha "
        assert sent[0] == [{"role": "user", "content": "alpha"}]
        assert sent[1] == [
            {"role": "user", "content": "alpha"},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": "beta gamma"},
        ]
        # A reload of the tab shows the same conversation and goes on from it.
        page.reload()
        page.fill("#max-tokens", "3")
        assert page.locator(".turn .user").all_text_contents() == ["alpha", "beta gamma"]
        assert [t.strip() for t in page.locator(".answer .text").all_text_contents()] == [
            "alpha alpha alpha",
            "beta gamma beta",
        ]
        # Regenerate: the same history is sent again, the old answer leaves the page.
        page.click("#regenerate")
        page.wait_for_selector("#send:not([disabled])")
        assert sent[2] == sent[1]
        assert page.locator(".turn").count() == 2
        stored = page.evaluate("JSON.parse(sessionStorage.getItem('tokenspout.conversation'))")
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
        # New conversation: nothing on the page or in the tab's storage; no history sent.
        page.click("#new-conversation")
        assert page.locator(".turn").count() == 0
        assert page.evaluate("sessionStorage.getItem('tokenspout.conversation')") is None
        say(page, "delta")
        assert sent[3] == [{"role": "user", "content": "delta"}]
        # Another tab has its own conversation.
        other = context.new_page()
        other.goto(server.url)
        assert other.locator(".turn").count() == 0
    finally:
        context.close()


def test_a_turn_without_an_answer_is_not_kept_or_resent(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    """A refused request (401 without the key, 413 for an oversize message) leaves no turn
    in the conversation: later requests carry only answered turns, also after a reload."""
    server = start_server(SyntheticEngine(itl_ms=2), api_key="sk-page", max_body_bytes=4096)
    page = browser.new_page()
    sent = chat_requests(page)

    try:
        page.goto(server.url)
        page.fill("#max-tokens", "3")
        assert "error" in say(page, "first question")  # no key yet: 401
        page.fill("#api-key", "sk-page")
        page.dispatch_event("#api-key", "change")
        assert "error" not in say(page, "second question")
        assert sent[-1] == [{"role": "user", "content": "second question"}]
        assert "larger than 4096 bytes" in say(page, "x" * 5000)
        # Regenerate asks the last answered question again; the unanswered turn goes too.
        page.click("#regenerate")
        page.wait_for_selector("#send:not([disabled])")
        assert sent[-1] == [{"role": "user", "content": "second question"}]
        assert page.locator(".turn .user").all_text_contents() == [
            "first question",
            "second question",
        ]
        page.reload()
        page.fill("#max-tokens", "3")
        assert "error" not in say(page, "third")
        assert [m["content"] for m in sent[-1] if m["role"] == "user"] == [
            "second question",
            "third",
        ]
    finally:
        page.close()
