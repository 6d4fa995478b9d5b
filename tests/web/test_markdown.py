"""Markdown answers in headless Chromium: formatted as they stream, safe against hostile
answers, re-rendering only the last block, copy buttons on code blocks.

The streamed tests send a real request to a real server whose engine emits a scripted
Markdown answer token by token (the synthetic engine echoes words without newlines, so it
cannot write Markdown); the renderer tests drive ``/static/markdown.js`` in the page."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import RunningServer
from tokenspout.engine.request import Prompt, SamplingParams
from tokenspout.engine.synthetic_engine import SyntheticEngine

pytestmark = pytest.mark.browser

STREAMED = '[data-kind="streamed"] .text'

ANSWER = """## Streaming *safely*

Here is **bold**, `inline code` and a [link](https://example.com/docs).
<img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> stay text.
A [bad link](javascript:window.__pwned=3) and [another](JAVASCRIPT:alert(1)) lose their URL.

- first item
- second item

| name | value |
| ---- | ----- |
| a    | 1     |

```python
def hello():
    return "<b>not bold</b>"
```

Done.
"""


class ScriptedEngine(SyntheticEngine):
    """The synthetic engine's pacing and bookkeeping, emitting ``text`` in word-sized
    tokens (whitespace kept) instead of echoing the prompt."""

    def __init__(self, text: str, **kwargs: float):
        super().__init__(**kwargs)
        self.tokens = re.findall(r"\s*\S+|\s+", text)

    def submit(self, request_id: str, prompt: Prompt, params: SamplingParams, sink):  # type: ignore[no-untyped-def,override]
        super().submit(request_id, prompt, params, sink)
        self._requests[request_id].words = itertools.cycle(self.tokens)


def scripted(start_server: Callable[..., RunningServer], text: str) -> tuple[RunningServer, int]:
    engine = ScriptedEngine(text, itl_ms=2)
    return start_server(engine), len(engine.tokens)


@pytest.fixture
def page(browser) -> Iterator[object]:  # type: ignore[no-untyped-def]
    # Playwright's string predicates need the CSP bypassed; it also means the sanitiser
    # alone, without the CSP's help, is what keeps scripts out.
    context = browser.new_context(bypass_csp=True)
    yield context.new_page()
    context.close()


def ask(page, server: RunningServer, max_tokens: int, prompt: str = "markdown please") -> None:  # type: ignore[no-untyped-def]
    page.goto(server.url)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#send:not([disabled])", timeout=15_000)


def test_streamed_markdown_renders_formatted_and_hostile_parts_stay_inert(
    start_server, page
) -> None:  # type: ignore[no-untyped-def]
    server, n = scripted(start_server, ANSWER)
    ask(page, server, n)
    page.wait_for_timeout(200)  # an onerror handler would have fired by now
    text = page.locator(STREAMED)
    assert text.locator("h2").text_content() == "Streaming safely"
    assert text.locator("h2 em").text_content() == "safely"
    assert text.locator("strong").text_content() == "bold"
    assert text.locator("p code").text_content() == "inline code"
    assert text.locator("li").all_text_contents() == ["first item", "second item"]
    assert text.locator("td").all_text_contents() == ["a", "1"]
    link = text.locator('a[href="https://example.com/docs"]')
    assert link.get_attribute("rel") == "noopener noreferrer"
    # Hostile parts: no element, no handler, no javascript: URL; shown as their characters.
    assert page.evaluate("window.__pwned") is None
    assert text.locator("img, script, [onerror]").count() == 0
    hrefs = text.locator("a").evaluate_all("links => links.map((a) => a.getAttribute('href'))")
    assert hrefs == ["https://example.com/docs"], hrefs
    shown = text.text_content()
    assert '<img src=x onerror="window.__pwned=1">' in shown
    assert "<script>window.__pwned=2</script>" in shown
    assert "bad link" in shown and "javascript:" not in shown
    # The code block: language label, copy button, the code as text.
    code = text.locator(".code")
    assert code.locator(".lang").text_content() == "python"
    assert code.locator("button.copy").count() == 1
    assert code.locator("code").text_content() == 'def hello():\n    return "<b>not bold</b>"'
    assert code.locator("b").count() == 0
    assert text.locator("p").last.text_content() == "Done."


def test_every_frame_is_one_dom_update_and_the_history_keeps_the_source(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server, n = scripted(start_server, ANSWER)
    page.goto(server.url)
    page.evaluate("""() => {
      window.__records = 0;
      new MutationObserver((r) => (window.__records += r.length)).observe(
        document.getElementById("log"), { childList: true, subtree: true, characterData: true });
      window.__frames = 0;
      const tick = () => { window.__frames++; requestAnimationFrame(tick); };
      requestAnimationFrame(tick);
    }""")
    page.fill("#max-tokens", str(n))
    page.fill("#prompt", "markdown please")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#send:not([disabled])", timeout=15_000)
    records, frames = page.evaluate("[window.__records, window.__frames]")
    # One replaceWith per frame, plus the page building the turn and the status lines.
    assert records <= frames + 15, (records, frames)
    stored = page.evaluate("JSON.parse(sessionStorage.getItem('tokenspout.conversation'))")
    assert stored[-1] == {"role": "assistant", "content": ANSWER}


RENDER = """async ([chunks]) => {
  const { MarkdownView } = await import("/static/markdown.js");
  const el = document.createElement("div");
  document.body.append(el);
  const view = new MarkdownView(el);
  let text = "";
  const lexed = [];
  const snapshots = [];
  for (const chunk of chunks) {
    text += chunk;
    view.update(text);
    lexed.push(view.lastLexed);
    snapshots.push(el.innerHTML);
  }
  const blocks = (e) => [...e.querySelectorAll(":scope > div > *")].map((b) => b.outerHTML);
  const whole = document.createElement("div");
  new MarkdownView(whole).update(text);
  const attributes = [...el.querySelectorAll("*")].flatMap(
    (e) => [...e.attributes].map((a) => `${e.tagName} ${a.name}=${a.value}`));
  return { lexed, snapshots, blocks: blocks(el), wholeBlocks: blocks(whole), attributes,
           hrefs: [...el.querySelectorAll("a")].map((a) => a.getAttribute("href")),
           tags: [...new Set([...el.querySelectorAll("*")].map((e) => e.tagName))],
           text: el.textContent, pwned: window.__pwned ?? null };
}"""


def render(page, server: RunningServer, chunks: list[str]) -> dict:  # type: ignore[no-untyped-def]
    page.goto(server.url)
    return page.evaluate(RENDER, [chunks])


def test_only_the_last_block_is_re_rendered_and_the_result_matches_a_whole_render(
    synthetic_server, page
) -> None:  # type: ignore[no-untyped-def]
    document = ANSWER * 30  # about 19 KB, 300 blocks
    chunks = re.findall(r"\s*\S+|\s+", document)
    result = render(page, synthetic_server, chunks)
    largest_block = max(len(b) for b in re.split(r"\n\n+", document))
    # What each update lexes is bounded by the largest block, not by the answer so far.
    assert max(result["lexed"]) <= largest_block + 80, max(result["lexed"])
    assert max(result["lexed"][-100:]) <= max(result["lexed"][:100]) + 80
    assert result["blocks"] == result["wholeBlocks"]


def test_column_alignments_and_a_list_start_survive_the_sanitiser(synthetic_server, page) -> None:  # type: ignore[no-untyped-def]
    table = "| a | b | c |\n| :--- | :---: | ---: |\n| 1 | 2 | 3 |\n\n3. three\n4. four\n"
    final = render(page, synthetic_server, [table])["snapshots"][-1]
    assert '<th align="left">a</th>' in final and '<td align="center">2</td>' in final, final
    assert '<td align="right">3</td>' in final
    assert '<ol start="3">' in final


def test_a_growing_code_block_gets_only_its_new_text_each_update(synthetic_server, page) -> None:  # type: ignore[no-untyped-def]
    lines = [f"let x{i} = '<b>{i}</b>';\n" for i in range(300)]
    chunks = ["Intro\n\n", "```js\n", *lines, "``", "`\n", "\nAfter *that*."]
    result = render(page, synthetic_server, chunks)
    inside = result["lexed"][3 : 2 + len(lines)]
    assert inside == [0] * len(inside), "lines of an open fence are appended, not re-lexed"
    assert result["blocks"] == result["wholeBlocks"], "closed, it renders as a whole render"
    assert "<em>that</em>" in result["snapshots"][-1]
    assert result["snapshots"][-1].count("<code>") == 1


def test_unterminated_fence_and_table_render_sensibly_mid_stream(synthetic_server, page) -> None:  # type: ignore[no-untyped-def]
    chunks = [
        "Intro\n\n```js\nlet a = 1;\n",
        "let b = <i>2</i>;\n",
        "```\n\nAfter.",
        "\n\n| x | y |\n|",
    ]
    chunks += ["---|---|\n| 1 |"]
    result = render(page, synthetic_server, chunks)
    mid = result["snapshots"][1]
    assert '<span class="lang">js</span>' in mid
    assert "let a = 1;\nlet b = &lt;i&gt;2&lt;/i&gt;;" in re.sub(r"<[^>]+>", "", mid), mid
    final = result["snapshots"][-1]
    assert "<p>After.</p>" in final
    assert "<th>x</th>" in final and "<td>1</td>" in final, final
    # An answer that stops inside a fence still shows its code as a code block.
    ended = render(page, synthetic_server, ["```\nunfinished <script>x</script>"])
    assert "<code>unfinished &lt;script&gt;x&lt;/script&gt;</code>" in ended["snapshots"][-1]


def test_hostile_html_links_and_a_200kb_line_stay_inert(synthetic_server, page) -> None:  # type: ignore[no-untyped-def]
    hostile = [
        '<img src=x onerror="window.__pwned=1">\n\n',
        "[x](javascript:window.__pwned=2) [y](  javascript:alert(1)) [z](data:text/html,hi)\n\n",
        '<a href="javascript:window.__pwned=3">click</a> <svg onload=window.__pwned=4>\n\n',
        "![img](https://example.com/a.png) [mail](mailto:a@example.com)\n\n",
    ]
    line = "word " * 40_000  # 200 KB without a line break
    result = render(
        page, synthetic_server, [*hostile, *(line[i : i + 4096] for i in range(0, len(line), 4096))]
    )
    page.wait_for_timeout(200)
    assert result["pwned"] is None and page.evaluate("window.__pwned") is None
    assert not {"IMG", "SVG", "SCRIPT", "IFRAME"} & set(result["tags"]), result["tags"]
    assert result["hrefs"] == ["https://example.com/a.png", "mailto:a@example.com"]
    for attribute in result["attributes"]:
        assert "javascript:" not in attribute.lower() and " on" not in attribute, attribute
    assert "&lt;img src=x onerror=" in result["snapshots"][-1]
    assert '<a href="javascript:window.__pwned=3">click</a>' in result["text"]
    assert result["text"].count("word") == 40_000


def test_copy_button_copies_the_code(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    server, n = scripted(start_server, ANSWER)
    context = browser.new_context(bypass_csp=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    try:
        page = context.new_page()
        ask(page, server, n)
        button = page.locator(f"{STREAMED} .code button.copy")
        button.click()
        page.wait_for_function("document.querySelector('.code .copy').textContent === 'Copied'")
        copied = page.evaluate("navigator.clipboard.readText()")
    finally:
        context.close()
    assert copied == 'def hello():\n    return "<b>not bold</b>"'


def test_a_200kb_single_line_streams_through_the_page(start_server, page) -> None:  # type: ignore[no-untyped-def]
    word = "<b>x</b>" + "y" * 41 + " "  # 50 characters, markup included
    engine = ScriptedEngine(word * 4096, itl_ms=0)
    server = start_server(engine, max_tokens_limit=4096)
    ask(page, server, 4096, prompt="one long line")
    text = page.locator(STREAMED)
    assert text.locator("b").count() == 0
    shown = text.text_content()
    assert shown.count("<b>x</b>") == 4096 and len(shown.strip()) == 50 * 4096 - 1
    assert "done (length)" in page.locator('[data-kind="streamed"] .status').text_content()
