"""The page at ``/`` in headless Chromium against the synthetic engine: text grows in many
frames, Stop stops the server, markup from the model stays text, telemetry reaches
/metrics, and an EventSource cut mid-stream resumes without losing or repeating text."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Route

pytestmark = pytest.mark.browser

STREAMED = '[data-kind="streamed"] .text'
MARKUP = '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>'

# Runs in the page for `ms`: the answer's length at every animation frame, the number of
# frames, and how many times the answer's DOM changed (for "one update per frame").
SAMPLE_GROWTH = """([selector, ms]) => new Promise((resolve) => {
  const lengths = [];
  let frames = 0, mutations = 0;
  const observer = new MutationObserver((records) => (mutations += records.length));
  observer.observe(document.getElementById("log"),
                   { characterData: true, childList: true, subtree: true });
  const t0 = performance.now();
  const tick = () => {
    frames++;
    const el = document.querySelector(selector);
    const n = el ? el.textContent.length : 0;
    if (lengths.at(-1) !== n) lengths.push(n);
    if (performance.now() - t0 < ms) requestAnimationFrame(tick);
    else { observer.disconnect(); resolve({ lengths, frames, mutations }); }
  };
  requestAnimationFrame(tick);
})"""


@pytest.fixture
def open_page(browser) -> Iterator[Callable[..., object]]:  # type: ignore[no-untyped-def]
    """``open_page(server, transport=..., max_tokens=..., compare=...)`` → a Playwright Page
    on the server's ``/`` with those settings."""
    pages = []

    def factory(server: RunningServer, transport: str = "fetch", **settings: object):  # type: ignore[no-untyped-def]
        # Playwright's wait_for_function evaluates strings, which the page's CSP forbids;
        # bypassing the CSP also means the markup test proves text insertion alone is safe.
        page = browser.new_page(bypass_csp=True)
        pages.append(page)
        page.goto(server.url)
        page.select_option("#transport", transport)
        if "max_tokens" in settings:
            page.fill("#max-tokens", str(settings["max_tokens"]))
        if settings.get("compare"):
            page.check("#compare")
        return page

    yield factory
    for page in pages:
        page.close()


def send(page, prompt: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_idle(page, timeout_ms: float = 15_000) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector("#send:not([disabled])", timeout=timeout_ms)


def test_text_grows_in_many_frames_one_update_each(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, max_tokens=200)
    assert page.locator("#synthetic").is_visible(), "the SYNTHETIC banner is shown"
    send(page, "one two three four five six seven eight")
    sample = page.evaluate(SAMPLE_GROWTH, [STREAMED, 2000])
    lengths = sample["lengths"]
    assert lengths == sorted(lengths), "text only grows"
    assert len(lengths) - 1 >= 5, f"visible growth steps in 2 s: {lengths}"
    # Each frame changes the answer's DOM once at most (plus the page building the turn).
    assert sample["mutations"] <= sample["frames"] + 10, sample


@pytest.mark.parametrize("transport", ["fetch", "eventsource", "websocket"])
def test_stop_stops_generation_on_the_server(start_server, open_page, transport: str) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, transport, max_tokens=4000)
    send(page, "keep going")
    page.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    assert server.metric("tokenspout_requests_running") == 1
    page.click("#stop")
    server.wait_metric("tokenspout_requests_running", 0, timeout=3)
    # Cancelled by the server's cancel path: not a dropped connection (a resumable
    # EventSource stream would outlive one).
    assert server.metric("tokenspout_requests_aborted_total", 'reason="cancelled"') == 1
    wait_idle(page)
    assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()


def test_event_source_stop_before_the_first_token_shows_none(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    # The server names the stream before its first token (`event: stream`): Stop cancels it
    # at once, not when a first token (a minute away here) would have told the page its id.
    server = start_server(SyntheticEngine(ttft_ms=60_000, itl_ms=30))
    page = open_page(server, "eventsource", max_tokens=4000)
    send(page, "keep going")
    page.click("#stop")
    wait_idle(page)
    assert page.locator(STREAMED).text_content() == ""
    assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()
    server.wait_metric("tokenspout_requests_aborted_total", 1, labels='reason="cancelled"')


def test_event_source_stopped_before_its_connection_opened_stays_cancelled(
    start_server, open_page
) -> None:  # type: ignore[no-untyped-def]
    # A stopped EventSource stays open until the server names its stream, to cancel it. Its
    # connection opening after the answer ended set the status back to "waiting for the
    # first token…" (CI hit it under load): the request is held here until after the Stop.
    server = start_server(SyntheticEngine(ttft_ms=60_000, itl_ms=30))
    page = open_page(server, "eventsource", max_tokens=4000)
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    stream_url = "**/v1/completions/stream?*"
    page.route(stream_url, hold)
    with page.expect_request(stream_url):
        send(page, "keep going")
    page.click("#stop")
    wait_idle(page)
    assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()
    assert len(held) == 1
    held[0].continue_()
    # The cancel goes once the server named the stream, after the connection opened.
    server.wait_metric("tokenspout_requests_aborted_total", 1, labels='reason="cancelled"')
    assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()


def test_event_source_stop_while_queued_cancels_on_the_server(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=30, max_num_seqs=1))
    holder = open_page(server, "fetch", max_tokens=4000)
    send(holder, "holding the only slot")
    holder.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    page = open_page(server, "eventsource", max_tokens=50)
    send(page, "queued behind it")
    server.wait_metric("tokenspout_requests_waiting", 1)
    page.click("#stop")
    wait_idle(page)
    assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()
    server.wait_metric("tokenspout_requests_waiting", 0)
    assert server.metric("tokenspout_requests_aborted_total", 'reason="cancelled"') == 1
    assert server.metric("tokenspout_requests_running") == 1, "the holder runs on"


def test_event_source_stop_retries_the_cancel_through_an_outage(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    # The stream is resumable: it outlives the closed EventSource, so a cancel that does not
    # get through (the network or the server down) is tried again until the server answers.
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, "eventsource", max_tokens=4000)
    attempts: list[str] = []

    def outage(route) -> None:  # type: ignore[no-untyped-def]
        attempts.append(route.request.url)
        if len(attempts) <= 2:
            route.abort("connectionrefused")
        else:
            route.continue_()

    page.route("**/v1/streams/*/cancel", outage)
    send(page, "keep going")
    page.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    # Waiting in Playwright: the sync API runs the route handler only while it is called.
    with page.expect_response("**/v1/streams/*/cancel", timeout=15_000) as cancelled:
        page.click("#stop")
        wait_idle(page)  # at once: the page does not wait for the server
        assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()
    assert cancelled.value.ok
    server.wait_metric("tokenspout_requests_aborted_total", 1, labels='reason="cancelled"')
    assert len(attempts) == 3
    assert server.metric("tokenspout_requests_running") == 0


def test_stop_in_compare_mode_says_stopped_in_both_columns(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, max_tokens=4000, compare=True)
    send(page, "keep going")
    page.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    page.click("#stop")
    wait_idle(page)
    assert page.locator('[data-kind="buffered"] .status').text_content() == "stopped"
    assert "cancelled" in page.locator('[data-kind="streamed"] .status').text_content()


def test_markup_from_the_model_is_shown_as_text(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=2))
    page = open_page(server, max_tokens=8, compare=True)
    send(page, MARKUP)
    wait_idle(page)
    page.wait_for_timeout(200)  # an onerror would fire by now
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".answer img, .answer script, .user img").count() == 0
    for kind in ("streamed", "buffered"):
        text = page.locator(f'[data-kind="{kind}"] .text').text_content()
        assert text.startswith(MARKUP), (kind, text)


def test_telemetry_reaches_metrics(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=2))
    page = open_page(server, "websocket", max_tokens=20, compare=True)
    send(page, "measure me")
    wait_idle(page)
    for transport in ("websocket", "buffered"):
        label = f'transport="{transport}"'
        server.wait_metric("tokenspout_client_ttft_seconds_count", 1, labels=label)
        assert server.metric("tokenspout_client_first_paint_seconds_count", label) == 1
        assert server.metric("tokenspout_client_complete_seconds_count", label) == 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "measure" not in metrics, "no prompt text in telemetry"


def _observations(server: RunningServer, histogram: str, label: str) -> float:
    """A client histogram's count for one transport (0 before its first observation)."""
    try:
        return server.metric(f"tokenspout_client_{histogram}_seconds_count", label)
    except KeyError:
        return 0


@pytest.mark.parametrize("transport", ["fetch", "eventsource", "websocket"])
def test_a_stopped_answer_reports_no_complete_time(start_server, open_page, transport: str) -> None:  # type: ignore[no-untyped-def]
    # The complete histogram is the time people waited for a whole answer: one stopped
    # halfway is not one (its first token and first paint were real, and are reported).
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, transport, max_tokens=4000)
    label = f'transport="{"sse" if transport == "fetch" else transport}"'
    send(page, "keep going")
    page.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    page.click("#stop")
    wait_idle(page)
    server.wait_metric("tokenspout_client_ttft_seconds_count", 1, labels=label)
    assert _observations(server, "first_paint", label) == 1
    assert _observations(server, "complete", label) == 0
    page.fill("#max-tokens", "3")
    send(page, "finish this one")
    wait_idle(page)
    server.wait_metric("tokenspout_client_ttft_seconds_count", 2, labels=label)
    assert _observations(server, "complete", label) == 1


class CuttingProxy:
    """A TCP relay in front of the server that drops the first EventSource stream after
    ``cut_after`` response bytes (mid-event), or just before the first ``cut_before`` in
    its response, as a flaky network would."""

    def __init__(self, target_port: int, cut_after: int = 0, cut_before: bytes = b""):
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut_before = cut_before
        self.cuts = 0
        self._armed = False
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream, cut), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, cut: threading.Event) -> None:
        while data := _recv(client):
            with self._lock:
                first_stream = b"GET /v1/completions/stream?" in data and not self._armed
                if first_stream and b"last-event-id" not in data.lower():
                    self._armed = True
                    cut.set()
            upstream.sendall(data)
        _close(upstream)

    def _down(self, client: socket.socket, upstream: socket.socket, cut: threading.Event) -> None:
        seen = b""  # the first stream's response so far
        while data := _recv(upstream):
            if cut.is_set():
                sent = len(seen)
                seen += data
                at = self._cut_at(seen)
                if at is not None:
                    client.sendall(data[: at - sent])
                    self.cuts += 1
                    break
            client.sendall(data)
        _close(client)
        _close(upstream)

    def _cut_at(self, seen: bytes) -> int | None:
        """Where the first stream's response is cut, once ``seen`` of it says."""
        if self.cut_before:
            at = seen.find(self.cut_before)
            return None if at == -1 else at
        return self.cut_after if len(seen) > self.cut_after else None

    def close(self) -> None:
        self.listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def seed_text(server: RunningServer, prompt: str, max_tokens: int) -> str:
    """The same answer read straight from the server (the synthetic engine is deterministic)."""
    params = {"prompt": prompt, "max_tokens": max_tokens, "flush_tokens": 1}
    tokens = []
    with httpx.stream("GET", f"{server.url}/v1/completions/stream", params=params) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                tokens.append(json.loads(line[6:])["token"])
    return "".join(tokens)


def event_source_through(
    browser: Browser, proxy: CuttingProxy, prompt: str, max_tokens: int
) -> tuple[str, str]:
    """The answer's source as the page received it over EventSource through ``proxy`` (what
    it keeps as the conversation), and its status line."""
    page = browser.new_page(bypass_csp=True)
    try:
        page.goto(proxy.url)
        page.select_option("#transport", "eventsource")
        page.fill("#max-tokens", str(max_tokens))
        send(page, prompt)
        # The browser waits its reconnection delay (about 3 s) before resuming.
        wait_idle(page, timeout_ms=20_000)
        shown = page.evaluate(
            "JSON.parse(sessionStorage.getItem('tokenspout.conversation')).at(-1).content"
        )
        return shown, page.locator('[data-kind="streamed"] .status').text_content() or ""
    finally:
        page.close()
        proxy.close()


def test_event_source_cut_mid_stream_resumes_exactly(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=10))
    prompt, max_tokens = "alpha beta gamma delta épsilon 日本", 150
    proxy = CuttingProxy(server.port, cut_after=700)
    shown, status = event_source_through(browser, proxy, prompt, max_tokens)
    assert proxy.cuts == 1, "the stream was cut"
    assert "error" not in status, status
    assert server.metric("tokenspout_stream_resumes_total") == 1, "resumed, not restarted"
    assert server.metric("tokenspout_generation_tokens_total") == max_tokens
    assert shown == seed_text(server, prompt, max_tokens)


def test_event_source_dropped_before_its_first_token_resumes_it(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    # The stream's id comes before its first token: the browser's reconnect sends it as
    # Last-Event-ID and resumes the stream, where it used to start a second generation.
    # The first token comes 300 ms after the stream is named, as when a browser is dropped
    # while it waits for it. With no wait the cut could come in the read that brought the
    # response's head, and one CI run saw no resume at all (the cause not found).
    server = start_server(SyntheticEngine(ttft_ms=300, itl_ms=10))
    prompt, max_tokens = "before the first token", 40
    proxy = CuttingProxy(server.port, cut_before=b'data: {"token"')
    shown, _ = event_source_through(browser, proxy, prompt, max_tokens)
    assert proxy.cuts == 1, "the stream was cut"
    assert server.metric("tokenspout_stream_resumes_total") == 1, "resumed, not restarted"
    assert server.metric("tokenspout_generation_tokens_total") == max_tokens
    assert shown == seed_text(server, prompt, max_tokens)


def test_event_source_shows_reconnecting_then_the_stream_lost(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=10))
    proxy = CuttingProxy(server.port, cut_after=700)
    page = browser.new_page(bypass_csp=True)
    lost = {"error": {"message": "no such stream", "code": "stream_not_found"}}

    opened: list[str] = []

    def restarted(route) -> None:  # type: ignore[no-untyped-def]
        # What a restarted server answers the reconnect (the second request; its
        # Last-Event-ID is not among the headers Playwright shows): it never heard of it.
        opened.append(route.request.url)
        if len(opened) > 1:
            route.fulfill(status=404, json=lost)
        else:
            route.continue_()

    page.route(lambda url: "/v1/completions/stream?" in url, restarted)
    status = '[data-kind="streamed"] .status'
    try:
        page.goto(proxy.url)
        page.select_option("#transport", "eventsource")
        page.fill("#max-tokens", "150")
        send(page, "alpha beta gamma")
        page.wait_for_function(
            f"document.querySelector('{status}')?.textContent.includes('reconnecting')"
        )
        wait_idle(page, timeout_ms=20_000)
        said = page.locator(status).text_content()
    finally:
        page.close()
        proxy.close()
    assert proxy.cuts == 1 and len(opened) == 2
    assert "the stream was lost" in said, said


def test_api_key_is_asked_and_kept_for_the_tab_only(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=2), api_key="sk-page")
    page = open_page(server, max_tokens=5)
    reports: list[str] = []
    page.on(
        "request",
        lambda r: reports.append(r.post_data or "") if r.url.endswith("/v1/telemetry") else None,
    )
    page.fill("#api-key", "sk-page")
    page.dispatch_event("#api-key", "change")
    for transport in ("fetch", "websocket", "eventsource"):
        page.select_option("#transport", transport)
        send(page, f"hello {transport}")
        wait_idle(page)
        assert f"hello {transport}" in page.locator(STREAMED).last.text_content()
    assert page.evaluate("() => sessionStorage.getItem('tokenspout.apiKey')") == "sk-page"
    assert page.evaluate("() => localStorage.length") == 0
    page.reload()
    assert page.input_value("#api-key") == "sk-page"  # the same tab keeps it
    assert all("sk-page" not in body and "hello" not in body for body in reports)


def test_compare_with_event_source_buffers_the_same_chat_request(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    """EventSource streams the last user message through the chat template (``chat=true``):
    the buffered twin sends that one message as a non-streamed chat completion."""
    server = start_server(SyntheticEngine(itl_ms=2))
    page = open_page(server, "eventsource", max_tokens=4, compare=True)
    posts: list[tuple[str, dict]] = []
    page.on(
        "request",
        lambda r: posts.append((r.url, json.loads(r.post_data))) if r.method == "POST" else None,
    )
    for prompt in ("first words", "second words"):
        send(page, prompt)
        wait_idle(page)
    buffered = [(url, body) for url, body in posts if not url.endswith("/v1/telemetry")]
    assert [url.removeprefix(server.url) for url, _ in buffered] == ["/v1/chat/completions"] * 2
    last = buffered[-1][1]
    assert last["messages"] == [{"role": "user", "content": "second words"}]
    assert last["stream"] is False
    texts = [page.locator(f'[data-kind="{kind}"] .text').last.text_content() for kind in
             ("buffered", "streamed")]  # fmt: skip
    assert texts[0] == texts[1], texts


def test_an_empty_buffered_answer_has_no_first_paint_and_no_report(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(itl_ms=2))
    page = open_page(server, max_tokens=4, compare=True)
    empty = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2},
    }  # fmt: skip

    def answer_empty(route) -> None:  # type: ignore[no-untyped-def]
        if json.loads(route.request.post_data).get("stream") is False:
            route.fulfill(json=empty)
        else:
            route.continue_()

    page.route("**/v1/chat/completions", answer_empty)
    reports: list[dict] = []
    page.on(
        "request",
        lambda r: (
            reports.append(json.loads(r.post_data)) if r.url.endswith("/v1/telemetry") else None
        ),
    )
    send(page, "say nothing")
    wait_idle(page)
    buffered = '[data-kind="buffered"]'
    assert page.locator(f'{buffered} [data-stat="paint"]').text_content() == "–"
    assert page.locator(f"{buffered} .status").text_content() == "done"
    # Both reports (if any) were made before the page went idle, and requests are seen in
    # the order the page makes them: once a later request is seen, they have been too.
    with page.expect_request("**/health"):
        page.evaluate("fetch('/health')")
    assert [r["transport"] for r in reports] == ["sse"]


def test_the_prompt_has_a_label(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    # A placeholder is no label: screen readers may not read it, and it goes once typed in.
    page = open_page(start_server(SyntheticEngine(itl_ms=2)))
    labelled = page.get_by_label("Message", exact=True).evaluate_all("es => es.map(e => e.id)")
    assert labelled == ["prompt"]


def test_stop_from_the_keyboard_leaves_the_focus_on_the_prompt(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    # Stop is disabled once the answer ended: the focus would fall to <body>, and a keyboard
    # user would start again from the top of the page.
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, max_tokens=4000)
    send(page, "keep going")
    page.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    page.focus("#stop")
    page.keyboard.press("Enter")
    wait_idle(page)
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_the_log_is_busy_while_an_answer_streams(start_server, open_page) -> None:  # type: ignore[no-untyped-def]
    # #log is a polite live region changed every frame: busy while the answer streams, so a
    # screen reader announces the answer once, whole, instead of every frame's fragment.
    server = start_server(SyntheticEngine(itl_ms=30))
    page = open_page(server, max_tokens=4000)
    assert page.get_attribute("#log", "aria-busy") in (None, "false")
    send(page, "keep going")
    page.wait_for_function(f"document.querySelector('{STREAMED}')?.textContent.length > 0")
    assert page.get_attribute("#log", "aria-busy") == "true"
    page.click("#stop")
    wait_idle(page)
    assert page.get_attribute("#log", "aria-busy") in (None, "false")


@pytest.mark.parametrize(("key", "said"), [("sk-wrong", "refused the API key"),
                                           ("", "needs an API key")])  # fmt: skip
def test_a_refused_websocket_says_why(start_server, open_page, key: str, said: str) -> None:  # type: ignore[no-untyped-def]
    # A browser's WebSocket tells the page nothing of a refused handshake (no status): the
    # page asks an HTTP route with the same key, which the server checks the same way.
    server = start_server(SyntheticEngine(itl_ms=2), api_key="sk-page")
    page = open_page(server, "websocket", max_tokens=5)
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    send(page, "hello")
    wait_idle(page)
    status = page.locator('[data-kind="streamed"] .status').text_content()
    assert "could not open the WebSocket" in status and said in status, status
