// open_paragraph.js: the last block of a streamed answer while it is a long paragraph.
//
// A paragraph without a blank line is one block however long it grows, so re-rendering
// "only the last block" would re-render all of it every frame. An OpenParagraph splits its
// text at safe points instead: the settled prefix is rendered once into the <p>, and each
// update re-lexes and re-renders only the tail after it (inside one <span class="md-tail">,
// replaced with one DOM mutation; finish() unwraps it).
//
// The browser, though, lays out all of a paragraph's lines whenever any of its text changes
// (one inline formatting context), so the settled text is also cut into blocks of lines:
// <span class="md-lines"> (display: block), each the paragraph's lines from one line start
// to the next block's. A block is cut where the browser itself started a new line, so every
// line keeps the text it had; only the last block's lines are laid out again on an update.
// (While the answer streams, a change of the page's width wraps each block by itself; finish()
// unwraps the blocks.)
//
// A point is safe when everything before it is finished inline constructs (emphasis, code
// spans, links, escapes) or plain text with no character that could still open one, and it
// sits inside plain text right after a single space: no later text can change how the
// prefix parses, so rendering the prefix and the tail apart gives what rendering the whole
// paragraph gives (tests/web/test_markdown.py checks it against one-shot renders). Until a
// safe point exists (say after a lone `*`), the tail simply stays long.
//
// Line by line, a paragraph stays open while each new line is plainly a continuation; a line
// that could end it or change its kind (blank, or starting like a heading, fence, quote,
// list item, HTML block, rule, setext underline or table row) makes extend() return false,
// and the caller re-lexes the paragraph as a block.

// Tail length at which a settle point is looked for: settling costs one more lex and render
// of the settled text, so it happens once per this many characters, not every frame.
const SETTLE_AT = 256;
// Characters settled into the last block of lines after which it is cut at a line start.
const LINES_AT = 1024;
// Characters that, in plain text, could still open (or be) an inline construct.
const UNSAFE_TEXT = /[\\`<>![\]*_~]/;
// Finished inline tokens: later text cannot change them. ("html" is not: an <a> tag changes
// how the lexer treats the rest of the paragraph.)
const CLOSED = new Set(["escape", "codespan", "strong", "em", "del", "link", "image", "br"]);
// The start of a line (sticky, at the line's first character) that might interrupt the
// paragraph or turn it into something else. Deliberately wider than Markdown's rules: a false
// alarm costs one re-lex of the block.
const MAY_INTERRUPT = new RegExp(
  " {0,3}(?:#{1,6}(?:[ \\t\\n]|$)|`{3}|~{3}|[>|<]|[-+*](?:[ \\t\\n]|$)|\\d{1,9}[.)](?:[ \\t\\n]|$)" +
    "|[-=_*:| \\t]*(?:\\n|$))",
  "y",
);

/** How many leading characters of `raw` (a text token's source) are plain, safe text. */
function safeLength(raw) {
  const unsafe = UNSAFE_TEXT.exec(raw);
  return unsafe === null ? raw.length : unsafe.index;
}

/** The last safe split point of `text`, given its inline `tokens` (0 if none). */
function settlePoint(text, tokens) {
  let position = 0;
  let best = 0;
  for (const token of tokens) {
    const plain = token.type === "text";
    const safe = plain ? safeLength(token.raw) : CLOSED.has(token.type) ? token.raw.length : 0;
    if (plain) {
      // After a single space that follows a non-space character, before a non-space one.
      for (let i = position + safe - 1; i >= Math.max(position, 1); i--) {
        if (text[i] === " " && /\S/.test(text[i - 1]) && /\S/.test(text[i + 1] ?? " ")) {
          best = Math.max(best, i + 1);
          break;
        }
      }
    }
    if (safe < token.raw.length) break;
    position += token.raw.length;
  }
  return best;
}

/** The offset in Text `node` where the last of its lines begins, or 0 if it is all on one line
 * (or not laid out). Layout is clean here (an update runs before the frame's layout), so
 * these are reads of the last frame's line boxes. */
function lastLineStart(node) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const lines = range.getClientRects();
  if (lines.length < 2) return 0;
  const top = lines[lines.length - 1].top;
  const onLastLine = (i) => {
    range.setStart(node, i);
    range.setEnd(node, i + 1);
    const rects = range.getClientRects();
    return rects.length > 0 && rects[0].top >= top - 0.5;
  };
  let lo = 1;
  let hi = node.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (onLastLine(mid)) hi = mid;
    else lo = mid + 1;
  }
  // Checked, not assumed (a collapsed space has no box): the line starts exactly here.
  return onLastLine(lo) && !onLastLine(lo - 1) ? lo : 0;
}

const sameTokens = (a, b) =>
  a.length === b.length && a.every((t, i) => t.type === b[i].type && t.raw === b[i].raw);

export class OpenParagraph {
  /**
   * @param p the paragraph's rendered <p> element, in the document
   * @param start offset of the paragraph's text in the answer
   * @param text the answer so far (line ends \n)
   * @param lexInline (source) => inline tokens; renderInline (tokens) => sanitised nodes
   */
  constructor(p, start, text, { lexInline, renderInline }) {
    this.p = p;
    this.start = start;
    this.settled = start; // the answer's offset up to which the paragraph is rendered for good
    this.tail = null; // the <span> holding the rest; null: all of p's children are the rest
    this.lines = null; // the last block of lines (<span class="md-lines">), holding the tail
    this.linesSettled = 0; // characters settled into it
    this.lineStart = Math.max(start, text.lastIndexOf("\n") + 1); // the first line to check
    this.lexInline = lexInline;
    this.renderInline = renderInline;
    this.lexed = 0; // characters lexed by the last extend() (what a frame costs)
  }

  /** Show `text` (the whole answer so far) with one DOM mutation; false if the paragraph may
   * have ended or changed kind (nothing was changed then). */
  extend(text) {
    if (!this.#continues(text)) return false;
    let source = text.slice(this.settled);
    if (source.endsWith("\n")) source = source.slice(0, -1); // as marked's paragraph text
    if (this.linesSettled >= LINES_AT) this.#cutLines();
    let tokens = this.lexInline(source);
    this.lexed = source.length;
    const nodes = [];
    const point = source.length >= SETTLE_AT ? settlePoint(source, tokens) : 0;
    if (point > 0) {
      // What the prefix lexes to alone must be what it was within the tail (checked, not
      // assumed): tokens before the point, and the text token cut at it, if any.
      const prefix = this.lexInline(source.slice(0, point));
      const rest = this.lexInline(source.slice(point));
      this.lexed += source.length;
      if (this.#splitsCleanly(tokens, prefix, point)) {
        nodes.push(this.renderInline(prefix));
        tokens = rest;
        this.settled += point;
        this.linesSettled += point;
      }
    }
    const tail = document.createElement("span");
    tail.className = "md-tail";
    tail.append(this.renderInline(tokens));
    nodes.push(tail);
    if (this.tail === null) {
      this.lines = document.createElement("span");
      this.lines.className = "md-lines";
      this.lines.append(...nodes);
      this.p.replaceChildren(this.lines);
    } else {
      this.tail.replaceWith(...nodes);
    }
    this.tail = tail;
    return true;
  }

  /** Leave the paragraph's DOM as a whole render would be (no tail or line wrappers). */
  finish() {
    this.tail?.replaceWith(...this.tail.childNodes);
    this.tail = null;
    for (const lines of this.p.querySelectorAll(":scope > .md-lines")) {
      lines.replaceWith(...lines.childNodes);
    }
    this.p.normalize();
    this.lines = null;
  }

  // Moves the last block's text from its last line start found in one of its own Text
  // children (the latest before the tail) to the end, tail included, into a new block after
  // it. The old block keeps its nodes, laid out already.
  #cutLines() {
    this.linesSettled = 0;
    for (let node = this.tail?.previousSibling; node; node = node.previousSibling) {
      if (node.nodeType !== Node.TEXT_NODE) continue;
      const at = lastLineStart(node);
      if (at === 0) continue;
      const range = document.createRange();
      range.setStart(node, at);
      range.setEndAfter(this.lines.lastChild);
      const next = document.createElement("span");
      next.className = "md-lines";
      next.append(range.extractContents());
      this.lines.after(next);
      this.lines = next;
      return;
    }
  }

  #splitsCleanly(tokens, prefix, point) {
    let length = 0;
    let whole = 0;
    while (whole < tokens.length && length + tokens[whole].raw.length <= point) {
      length += tokens[whole].raw.length;
      whole += 1;
    }
    const expected = tokens.slice(0, whole);
    if (length < point) {
      expected.push({ type: "text", raw: tokens[whole].raw.slice(0, point - length) });
    }
    return sameTokens(prefix, expected);
  }

  // Checks the lines that appeared since the last call, and the last line so far (it may
  // still become a rule or an underline): blank lines and possible block starts end it.
  #continues(text) {
    for (;;) {
      const end = text.indexOf("\n", this.lineStart);
      if (end === -1) break;
      if (this.#mayInterrupt(text, this.lineStart)) return false;
      this.lineStart = end + 1;
    }
    return this.lineStart === text.length || !this.#mayInterrupt(text, this.lineStart);
  }

  #mayInterrupt(text, at) {
    // The paragraph's first line is part of what was lexed as a paragraph.
    if (at <= this.start) return false;
    MAY_INTERRUPT.lastIndex = at;
    return MAY_INTERRUPT.test(text);
  }
}
