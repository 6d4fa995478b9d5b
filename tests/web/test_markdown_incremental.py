"""The Markdown renderer's work per update does not grow with the answer, in headless
Chromium: a long code block, a long paragraph and a long table (the shapes whose last block
is the whole answer) are streamed in place, end as a one-shot render would (a long table that
ends the answer: with the same cells, in tables of rows laid out as one), and stay safe.

No timings: the page's renderer reports what each update lexed (``lastLexed``), a
MutationObserver counts the DOM mutations and the nodes each update inserted, and the nodes
of an early table row and of the paragraph's first text are kept to check that they are
still the ones in the document at the end (a renderer that replaced the whole block on some
update would have made new ones); early and late updates of the same answer are compared."""

from __future__ import annotations

import itertools
import re

import pytest

pytestmark = pytest.mark.browser

STREAM = """async ([chunks]) => {
  const { MarkdownView } = await import("/static/markdown.js");
  const { CHUNK_ROWS } = await import("/static/open_table.js");
  // In the page's answer markup, so that its style sheet applies.
  const section = document.createElement("section");
  section.className = "answer";
  const el = document.createElement("div");
  el.className = "text";
  section.append(el);
  document.body.append(section);
  const view = new MarkdownView(el);
  const observer = new MutationObserver(() => {});
  observer.observe(el, { childList: true, subtree: true, characterData: true });
  const size = (node) => {
    let n = 1;
    for (const child of node.childNodes) n += size(child);
    return n;
  };
  const firstText = (root) => {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    return walker.nextNode();
  };
  let text = "";
  let earlyRow = null;
  let laterRow = null;
  let earlyText = null;
  const updates = [];
  for (const chunk of chunks) {
    text += chunk;
    view.update(text);
    // The first row once it is finished (a later row follows it).
    if (earlyRow === null && el.querySelectorAll("tbody > tr").length >= 3) {
      earlyRow = el.querySelector("tbody > tr");
    }
    // A finished row in the third table of rows, once a long table is cut into tables.
    const third = el.querySelectorAll(".md-table table")[2];
    if (laterRow === null && third?.rows.length >= 2) laterRow = third.rows[0];
    const p = el.querySelector(".md-live > p");
    if (earlyText === null && p !== null && text.length > 2000) earlyText = firstText(p);
    const records = observer.takeRecords();
    let inserted = 0;
    for (const record of records) for (const node of record.addedNodes) inserted += size(node);
    updates.push({ lexed: view.lastLexed, mutations: records.length, inserted,
                   lineBlocks: el.querySelectorAll(".md-lines").length,
                   tables: el.querySelectorAll("table").length });
  }
  // Each row's cells (their sanitised markup) and, laid out, each cell's left and right edges
  // and each row's top and bottom.
  const table = (root) =>
    [...root.querySelectorAll("tr")].map((tr) => [...tr.cells].map((c) => c.innerHTML));
  const edges = (c) => [c.getBoundingClientRect().left, c.getBoundingClientRect().right];
  const geometry = [...el.querySelectorAll("table")].map((t) => [...t.rows].map((tr) => {
    const row = tr.getBoundingClientRect();
    return { top: row.top, bottom: row.bottom, cells: [...tr.cells].map(edges) };
  }));
  const colgroups =
    [...el.querySelectorAll("table")].map((t) => t.querySelector("colgroup")?.outerHTML);
  const streamedCells = table(el);
  const blocks = (e) => [...e.querySelectorAll(":scope > div > *")].map((b) => b.outerHTML);
  // Before finish(): the DOM as streamed, without the wrappers of a paragraph's tail and
  // blocks of lines.
  const streamed = el.cloneNode(true);
  for (const wrapper of streamed.querySelectorAll(".md-tail, .md-lines")) {
    wrapper.replaceWith(...wrapper.childNodes);
  }
  streamed.normalize();
  const beforeFinish = blocks(streamed);
  const kept = (node) => node !== null && node.isConnected && el.contains(node);
  const earlyRowKept = kept(earlyRow) && el.querySelector("tbody > tr") === earlyRow;
  const laterRowKept = kept(laterRow);
  const earlyTextKept = kept(earlyText);
  // Cut into blocks of lines at the browser's own line starts, the paragraph is as tall as
  // the same text in one block (a cut elsewhere would end a line early: one more line).
  const height = () => el.querySelector(".md-live > p")?.getBoundingClientRect().height ?? 0;
  const heightStreamed = height();
  view.finish();
  const heightFinished = height();
  const whole = document.createElement("div");
  const oneShot = new MarkdownView(whole);
  oneShot.update(text);
  oneShot.finish();
  const hrefs = [...el.querySelectorAll("a")].map((a) => a.getAttribute("href"));
  const attributes = [...el.querySelectorAll("*")].flatMap(
    (e) => [...e.attributes].map((a) => `${e.tagName} ${a.name}=${a.value}`));
  return { updates, beforeFinish, blocks: blocks(el), oneShot: blocks(whole),
           tags: [...new Set([...el.querySelectorAll("*")].map((e) => e.tagName))],
           hrefs, attributes, rels: [...el.querySelectorAll("a")].map((a) => a.rel),
           tails: el.querySelectorAll(".md-tail").length, pwned: window.__pwned ?? null,
           earlyRowKept, laterRowKept, earlyTextKept, heightStreamed, heightFinished,
           lineBlocks: el.querySelectorAll(".md-lines").length,
           cells: streamedCells, finishedCells: table(el), oneShotCells: table(whole),
           geometry, colgroups, heads: el.querySelectorAll("thead").length,
           headerCells: el.querySelectorAll("th").length, chunkRows: CHUNK_ROWS };
}"""

# Prose with the inline constructs a model writes, none left open.
SENTENCE = (
    "Sentence {i} has **bold {i}**, *emphasis*, `code_{i} < 2`, a [link](https://example.com/{i}"
    ' "title"), an autolink https://example.org/p/{i}, an escaped \\* star, A&amp;B & C, '
    "~~struck~~ and a long tail of ordinary words to read through. "
)


def stream(page, server, text: str, words_per_update: int = 1) -> dict:  # type: ignore[no-untyped-def]
    words = re.findall(r"\s*\S+|\s+", text)
    n = words_per_update
    page.goto(server.url)
    return page.evaluate(STREAM, [["".join(words[i : i + n]) for i in range(0, len(words), n)]])


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(bypass_csp=True)
    yield context.new_page()
    context.close()


def assert_flat(updates: list[dict], key: str) -> None:
    """The largest value of ``key`` in the last tenth of the updates is no more than half
    again the largest in the second tenth (the first is skipped: the paragraph or fence is
    still short there), although the answer is five times as long."""
    tenth = len(updates) // 10
    early = max(u[key] for u in updates[tenth : 2 * tenth])
    late = max(u[key] for u in updates[-tenth:])
    assert late <= 1.5 * early, (key, early, late)


def test_a_long_paragraph_re_renders_only_its_tail_and_ends_as_a_one_shot_render(
    synthetic_server, page
) -> None:  # type: ignore[no-untyped-def]
    # About 60 KB in one paragraph: a few soft line breaks, no blank line.
    text = "".join(
        SENTENCE.format(i=i) + ("\n" if i % 25 == 24 else "") for i in range(150)
    ).rstrip()
    result = stream(page, synthetic_server, text)
    updates = result["updates"]
    assert_flat(updates, "lexed")
    assert_flat(updates, "inserted")
    assert max(u["lexed"] for u in updates[-100:]) < len(text) / 20
    # One DOM mutation per update, but where a block of lines was cut off.
    cuts = {
        i for i in range(1, len(updates)) if updates[i]["lineBlocks"] > updates[i - 1]["lineBlocks"]
    }
    assert len(cuts) >= len(text) // 4096, "the paragraph is streamed as blocks of lines"
    assert all(u["mutations"] == 1 for i, u in enumerate(updates) if i not in cuts)
    assert result["heightStreamed"] == result["heightFinished"] > 0
    assert result["lineBlocks"] == 0
    assert len(result["oneShot"]) == 1 and result["oneShot"][0].startswith("<p>")
    assert result["beforeFinish"] == result["oneShot"], "streamed in pieces, rendered as one"
    assert result["blocks"] == result["oneShot"] and result["tails"] == 0
    assert result["earlyTextKept"], "the paragraph's first text was never rendered again"


def test_a_long_code_block_gets_only_its_new_text_and_ends_as_a_one_shot_render(
    synthetic_server, page
) -> None:  # type: ignore[no-untyped-def]
    code = "".join(f"let x{i} = '<b>{i}</b>' && f(`*{i}*`);\n" for i in range(1000))
    result = stream(page, synthetic_server, "Intro\n\n```js\n" + code)  # the answer stops open
    updates = result["updates"]
    assert_flat(updates, "lexed")
    assert_flat(updates, "inserted")
    assert max(u["lexed"] for u in updates[-100:]) == 0, "lines of an open fence are not re-lexed"
    # Mostly one mutation; where a block of 32 lines ends inside the update's text, two.
    assert max(u["mutations"] for u in updates) <= 2
    # Out-of-view lines are in blocks of 32 lines that the browser need not lay out.
    assert result["beforeFinish"][-1].count('class="code-lines"') >= 1000 // 32 - 1
    assert result["blocks"] == result["oneShot"]
    assert "&lt;b&gt;999&lt;/b&gt;" in result["blocks"][-1]
    closed = stream(page, synthetic_server, "```js\n" + code + "```\n\nAfter *that*.")
    assert closed["blocks"] == closed["oneShot"] == closed["beforeFinish"]


# Hostile links and markup in code spans are finished inline constructs: a settled prefix
# may hold them. Raw HTML is not: after it, the paragraph's tail stays long.
HOSTILE_LINKS = (
    "Then [x](javascript:window.__pwned=2) and [y]( JAVASCRIPT:alert(1)) and [z](data:text/html,x)"
    " and [ok](https://example.com/ok) plus `<svg onload=window.__pwned=5>` words words. "
)
HOSTILE_HTML = (
    'Text <img src=x onerror="window.__pwned=1"> and <a href="javascript:window.__pwned=3">a</a>'
    " and <script>window.__pwned=4</script> words. "
)


@pytest.mark.parametrize(
    "ending",
    [
        "",
        "\n---\n\nAfter.",  # a setext underline turns the whole paragraph into a heading
        "\n- a list item\n",
        "\n| a | b |\n| --- | --- |\n| 1 | 2 |\n",
        "\n# Heading\n\nAnd *more*.",
        "\n```py\nx = 1\n```\n",
        "\n\nA new paragraph, 2 * 3 = 6, snake_case and a lone [ bracket.",
    ],
    ids=["open", "setext", "list", "table", "heading", "fence", "blank line"],
)
def test_a_long_paragraph_with_hostile_parts_stays_inert_and_ends_as_a_one_shot_render(
    synthetic_server, page, ending: str
) -> None:  # type: ignore[no-untyped-def]
    # Hostile parts throughout, and sentences whose unmatched delimiters give no safe point.
    prose = "".join(SENTENCE.format(i=i) for i in range(4))
    spanning = (
        "*emphasis over " + "plain words " * 60 + "to here* and `a code " + "span " * 60 + "end` "
    )
    text = (
        (prose + HOSTILE_LINKS) * 3 + spanning + HOSTILE_HTML + prose + "A lone * " + prose + ending
    )
    result = stream(page, synthetic_server, text, words_per_update=3)
    page.wait_for_timeout(200)  # an onerror handler would have fired by now
    assert result["pwned"] is None and page.evaluate("window.__pwned") is None
    assert not {"IMG", "SVG", "SCRIPT"} & set(result["tags"]), result["tags"]
    assert all(h.startswith("https://") for h in result["hrefs"]), set(result["hrefs"])
    assert set(result["rels"]) == {"noopener noreferrer"}
    for attribute in result["attributes"]:
        assert "javascript:" not in attribute.lower() and " on" not in attribute, attribute
    assert result["blocks"] == result["oneShot"]
    if ending == "":
        assert result["beforeFinish"] == result["oneShot"]


# Table cells with inline Markdown, hostile parts, escaped pipes and ragged rows.
ROW = (
    "| {i} | **{i}** `a\\|b` | [ok](https://example.com/{i}) [x](javascript:window.__pwned=1)"
    " <img src=x onerror=window.__pwned=2> |{extra}\n"
)


@pytest.mark.parametrize("ending", ["", "\nAfter the table, *done*."], ids=["open", "closed"])
def test_a_long_table_appends_its_rows_and_ends_with_a_one_shot_renders_cells(
    synthetic_server, page, ending: str
) -> None:  # type: ignore[no-untyped-def]
    rows = "".join(ROW.format(i=i, extra=" surplus |" if i % 7 == 0 else "") for i in range(400))
    text = "Intro\n\n| n | text | links |\n| ---: | :---: | --- |\n" + rows + ending
    result = stream(page, synthetic_server, text, words_per_update=2)
    updates = result["updates"]
    page.wait_for_timeout(200)  # an onerror handler would have fired by now
    assert result["pwned"] is None and page.evaluate("window.__pwned") is None
    assert "IMG" not in result["tags"]
    assert all(h.startswith("https://") for h in result["hrefs"]), set(result["hrefs"])
    assert result["oneShot"][-1 if ending == "" else -2].count("<tr>") == 401
    assert len(result["oneShotCells"]) == 401
    assert "<strong>399</strong>" in result["oneShotCells"][-1][1]
    if ending != "":
        # The table ended: it was rendered again as a block, one table.
        assert result["blocks"] == result["oneShot"]
    else:
        assert_flat(updates, "lexed")
        assert_flat(updates, "inserted")
        assert max(u["lexed"] for u in updates[-100:]) < len(text) / 20
        # One DOM mutation per update, but where a table of rows was started (a few: the
        # unfinished row and its white space leave the full table, the new one is added; the
        # first time, the first table also moves into the <div> that holds them).
        starts = {
            i for i in range(1, len(updates)) if updates[i]["tables"] > updates[i - 1]["tables"] > 0
        }
        assert len(starts) == len(result["geometry"]) - 1
        assert all(u["mutations"] <= 1 for i, u in enumerate(updates) if i not in starts)
        assert max(updates[i]["mutations"] for i in starts) <= 6
        assert result["earlyRowKept"], "the first row was never rendered again"
        assert result["laterRowKept"], "a row of a later table of rows was never rendered again"
        assert_one_table(result)


def assert_one_table(result: dict) -> None:
    """A long table streamed in tables of rows: the header once, every cell as the one-shot
    render has it, and laid out as one table (its columns aligned, its rows spaced alike)."""
    assert result["cells"] == result["finishedCells"] == result["oneShotCells"]
    assert result["heads"] == 1 and result["headerCells"] == 3
    tables = result["geometry"]
    chunk = result["chunkRows"]
    assert len(tables) >= 400 // chunk, "the table is cut into tables of rows"
    assert chunk <= len(tables[0]) - 1 <= chunk + 2  # its header row and the first rows
    assert all(len(rows) == chunk for rows in tables[1:-1]) and len(tables[-1]) <= chunk
    assert len(set(result["colgroups"])) == 1 and result["colgroups"][0].count("<col ") == 3
    header = tables[0][0]["cells"]
    rows = [row for rows in tables for row in rows]
    for row in rows:
        edges = [edge for cell in row["cells"] for edge in cell]
        head = [edge for cell in header for edge in cell]
        assert len(edges) == len(head) and all(
            abs(a - b) < 0.01 for a, b in zip(edges, head, strict=True)
        ), (row, header)
    gaps = {round(after["top"] - before["bottom"], 2) for before, after in itertools.pairwise(rows)}
    assert len(gaps) == 1, gaps  # the same between tables as between rows of one table
