// markdown.js: renders a streamed answer as Markdown, one block at a time, safely.
//
//   const view = new MarkdownView(element);
//   view.update(textSoFar);  // at most once per animation frame; the text only grows
//
// Incremental: blocks before the last one are final (Markdown blocks do not change once a
// later block has started), so they are rendered once and kept; each update re-lexes and
// re-renders only the text from the start of the last block. Where the last block can grow
// without end, even that is too much, so three kinds are streamed in place: an open code
// fence gets its new lines appended as text, a long paragraph is split at safe points
// (open_paragraph.js) so that only its tail is re-rendered, and a table gets its new rows
// appended (open_table.js), only its unfinished last row rendered again, and once it is long,
// into further tables of rows with the same kept column widths, so that the browser lays out
// only the last of them. A frame's cost then depends on what arrived since the last frame,
// not on the answer's length. finish() leaves the DOM as a whole render of the answer would
// be, but for a long table at its end: that one keeps its tables of rows (same cells).
//
// Safe: marked (vendored, see vendor/README.md) turns Markdown into HTML with raw HTML
// escaped as text by our renderer, then DOMPurify builds the DOM nodes from it, keeping
// only the tags and attributes below and only http, https and mailto URLs. The page's CSP
// (script-src 'self') is the third line of defence.

import { Marked } from "/static/vendor/marked.esm.js";
import DOMPurify from "/static/vendor/purify.es.mjs";
import { OpenParagraph } from "/static/open_paragraph.js";
import { OpenTable } from "/static/open_table.js";

const SAFE_URL = /^(?:https?:|mailto:)/i;
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const markdown = new Marked({
  gfm: true,
  renderer: {
    // Raw HTML from the model is shown as the characters it is.
    html({ text, block }) {
      return block ? `<p class="raw">${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    link({ href, title, tokens }) {
      const inner = this.parser.parseInline(tokens);
      if (!SAFE_URL.test(href.trim())) return inner; // javascript:, data:, relative: text only
      const t = title ? ` title="${escapeHtml(title)}"` : "";
      return `<a href="${escapeHtml(href)}"${t}>${inner}</a>`;
    },
    // Images would load from wherever the model points (the CSP blocks other origins):
    // shown as a link to the image instead.
    image({ href, text }) {
      const label = escapeHtml(text || "image");
      return SAFE_URL.test(href.trim()) ? `<a href="${escapeHtml(href)}">🖼 ${label}</a>` : label;
    },
    // Task lists: a character, not a form control.
    checkbox({ checked }) {
      return checked ? "☑ " : "☐ ";
    },
    code({ text, lang }) {
      const name = (lang ?? "").trim().split(/\s+/)[0];
      const label = name ? `<span class="lang">${escapeHtml(name)}</span>` : "";
      return (
        `<div class="code"><div class="code-bar">${label}` +
        `<button type="button" class="copy">Copy</button></div>` +
        `<pre><code>${escapeHtml(text)}</code></pre></div>`
      );
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "button", "code", "del", "div", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "li", "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th",
    "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "type", "align", "start"],
  ALLOWED_URI_REGEXP: SAFE_URL,
  // DOMPurify checks every attribute that is not on its list of attributes that are never
  // URLs against ALLOWED_URI_REGEXP, which would drop a column's alignment, a list's start
  // and the copy button's type; none of them is a URL.
  ADD_URI_SAFE_ATTR: ["align", "start", "type"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("rel", "noopener noreferrer");
    node.setAttribute("target", "_blank");
  }
});

/** Sanitised DOM nodes for a list of marked block tokens. */
function render(tokens) {
  return DOMPurify.sanitize(markdown.parser(tokens), PURIFY);
}

// A paragraph's inline text, lexed and rendered as marked does inside a paragraph.
const INLINE = {
  lexInline: (source) => markdown.Lexer.lexInline(source, markdown.defaults),
  renderInline: (tokens) =>
    DOMPurify.sanitize(markdown.Parser.parseInline(tokens, markdown.defaults), PURIFY),
};
// One row of a table (OpenTable): `head` (its header line and delimiter row) and `line`
// rendered as a table; its row's <tr> and the white space after it, or null if that is not
// one table of exactly one row.
function renderRow(head, line) {
  const tokens = markdown.lexer(head + line);
  if (tokens.length !== 1 || tokens[0].type !== "table" || tokens[0].rows.length !== 1) {
    return null;
  }
  const row = render(tokens).querySelector("tbody > tr");
  if (row === null) return null;
  return row.nextSibling?.nodeType === Node.TEXT_NODE ? [row, row.nextSibling] : [row];
}

// A last block that is a paragraph this long is streamed in place (OpenParagraph).
const OPEN_PARAGRAPH_AT = 512;

const FENCE_OPENING = /^(`{3,}|~{3,})/;
const SEGMENT_LINES = 32;

/** Whether a line of `text` could close a fence opened with `marker` (the partial last
 * line included: it may be the closing fence itself, at the very end of the answer). */
function mayClose(text, marker) {
  for (const line of text.split("\n")) {
    const m = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(line);
    if (m && m[1][0] === marker[0] && m[1].length >= marker.length) return true;
  }
  return false;
}

/** Renders an answer's Markdown into `element` as the answer grows (see the module doc). */
export class MarkdownView {
  constructor(element) {
    this.element = element;
    this.committed = 0; // characters of the text rendered as final blocks
    this.live = document.createElement("div"); // the last block, re-rendered each update
    this.live.className = "md-live";
    element.append(this.live);
    this.lastLexed = 0; // characters lexed by the last update (what a frame costs)
    // An open code fence being streamed: {code element, marker, text seen, partial line}.
    this.fence = null;
    this.paragraph = null; // a long last paragraph being streamed (OpenParagraph)
    this.table = null; // a last block that is a table being streamed (OpenTable)
    this.text = "";
  }

  /** Show `text` (the whole answer so far; it only grows): one DOM mutation. */
  update(text) {
    this.text = text;
    if (this.#extendFence(text)) return;
    if (this.paragraph?.extend(text)) {
      this.lastLexed = this.paragraph.lexed;
      return;
    }
    if (this.table?.extend(text)) {
      this.lastLexed = this.table.lexed;
      return;
    }
    this.paragraph = null;
    this.table = null;
    this.#renderLastBlock(text);
  }

  /** The answer is complete: leave the DOM as a one-shot render of it would be. An open
   * fence's code (appended in pieces) is rendered once more as a whole; a long paragraph
   * loses the wrappers of its tail and of its blocks of lines. A long table that ends the
   * answer stays in its tables of rows (one table would cost a layout of all its rows and
   * move its columns): the same cells as a one-shot render, columns as they streamed. */
  finish() {
    if (this.fence !== null) this.#renderLastBlock(this.text, false);
    this.paragraph?.finish();
    this.paragraph = null;
    this.table = null;
  }

  // Re-lexes and renders the text from the start of the last block; `stream`: whether the
  // last block may then be streamed in place (an open fence, a long paragraph or a table).
  #renderLastBlock(text, stream = true) {
    const tail = text.slice(this.committed);
    this.lastLexed = tail.length;
    const tokens = markdown.lexer(tail);
    let last = tokens.length - 1;
    while (last > 0 && tokens[last].type === "space") last -= 1;
    const fragment = document.createDocumentFragment();
    const final = tokens.slice(0, last);
    const finalText = final.map((token) => token.raw).join("");
    // marked's tokens carry their exact source (checked, rather than assumed: a token whose
    // raw text was normalised stays live instead of shifting every later block).
    if (final.length > 0 && tail.startsWith(finalText)) {
      const block = document.createElement("div");
      block.className = "md-done";
      block.append(render(final));
      fragment.append(block);
      this.committed += finalText.length;
    } else {
      last = 0;
    }
    const live = document.createElement("div");
    live.className = "md-live";
    if (last >= 0) live.append(render(tokens.slice(last)));
    fragment.append(live);
    this.fence = null;
    if (stream) {
      this.#watchFence(text, last >= 0 ? tokens[last] : null, live);
      this.#watchParagraph(text, tokens, last, live);
      this.#watchTable(text, tokens[last], live);
    }
    this.live.replaceWith(fragment);
    this.live = live;
  }

  // A long paragraph that is the last block and runs to the end of the text (no blank line
  // after it) is streamed in place from the next update on. Its text must start the block's
  // source (it does, unless marked normalised it: then it is re-rendered as a block).
  #watchParagraph(text, tokens, last, live) {
    const token = tokens[last];
    if (token?.type !== "paragraph" || token.text.length < OPEN_PARAGRAPH_AT) return;
    if (this.committed + token.raw.length !== text.length) return;
    if (!text.startsWith(token.raw, this.committed) || !token.raw.startsWith(token.text)) return;
    const p = live.firstElementChild;
    if (p?.tagName !== "P") return;
    this.paragraph = new OpenParagraph(p, this.committed, text, INLINE);
  }

  // A table that is the last block and runs to the end of the text gets its rows appended
  // from the next update on.
  #watchTable(text, token, live) {
    if (token?.type !== "table" || this.committed + token.raw.length !== text.length) return;
    const table = live.firstElementChild;
    if (table?.tagName !== "TABLE") return;
    this.table = OpenTable.open(table, this.committed, text, renderRow);
  }

  // A code fence that is still open grows by lines of code, which cannot be Markdown:
  // they are appended to its code element as text (one Text node per frame), so that a
  // long code block costs each frame only its new text rather than re-rendering the block
  // (and re-laying out all of it). Until a line appears that could close the fence.
  #watchFence(text, token, live) {
    const marker = token?.type === "code" ? FENCE_OPENING.exec(token.raw)?.[1] : undefined;
    if (!marker) return;
    const newline = token.raw.indexOf("\n");
    const body = newline === -1 ? "" : token.raw.slice(newline + 1);
    const code = live.querySelector("pre > code");
    if (newline === -1 || mayClose(body, marker) || code === null) return;
    // The code exactly as written so far (marked trims the last newline), as plain text.
    code.textContent = body;
    const partial = body.slice(body.lastIndexOf("\n") + 1);
    const lines = body.split("\n").length - 1;
    this.fence = { code, marker, seen: text.length, partial, target: code, lines };
  }

  #extendFence(text) {
    const fence = this.fence;
    if (fence === null || text.length <= fence.seen) return fence !== null;
    const added = text.slice(fence.seen);
    const pending = fence.partial + added;
    if (mayClose(pending, fence.marker)) return false;
    // New lines go into blocks of SEGMENT_LINES lines, so that those out of view are not
    // laid out or rendered (content-visibility in style.css). A block ends at the end of a
    // line, which is mostly inside a frame's new text (tokens often start with "\n"): then
    // the line's end goes to the full block and the rest starts the next one, two
    // mutations in the same update.
    let rest = added;
    if (fence.lines >= SEGMENT_LINES && (fence.partial === "" || added.includes("\n"))) {
      const cut = fence.partial === "" ? 0 : added.indexOf("\n") + 1;
      if (cut > 0) fence.target.append(added.slice(0, cut));
      rest = added.slice(cut);
      fence.target = document.createElement("span");
      fence.target.className = "code-lines";
      fence.target.append(rest);
      fence.code.append(fence.target);
      fence.lines = 0;
    } else {
      fence.target.append(added);
    }
    fence.lines += rest.split("\n").length - 1;
    fence.seen = text.length;
    fence.partial = pending.slice(pending.lastIndexOf("\n") + 1);
    this.lastLexed = 0;
    return true;
  }
}

/** Copy buttons of code blocks under `root` copy their block's code (one listener). */
export function enableCopyButtons(root) {
  root.addEventListener("click", async (event) => {
    const button = event.target.closest?.(".code .copy");
    if (!button) return;
    const code = button.closest(".code").querySelector("code").textContent;
    try {
      await navigator.clipboard.writeText(code);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
}
