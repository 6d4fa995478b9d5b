// open_table.js: the last block of a streamed answer while it is a table.
//
// A table with no blank line after it is one block however many rows it gets, so
// re-rendering "only the last block" would re-render, restyle and lay out the whole table
// every frame. An OpenTable appends instead: each finished row (a line ended by "\n") is
// rendered once and appended to the table's body, and only the last, unfinished line is
// rendered again on each update (its <tr> replaced). Rows already shown are never touched.
//
// A GFM table row is parsed from its own line and the header's columns and alignments alone,
// so a row rendered apart (the table's header line, its delimiter row and that one line,
// lexed, rendered and sanitised like any block: renderRow) is the row a one-shot render
// gives. That is checked rather than assumed: a line that does not come out as exactly one
// row makes extend() return false, as does a line that could end the table (blank, or
// starting like a heading, fence, quote, list item, HTML block, rule or indented code:
// marked's rule, widened; a false alarm costs one re-render of the table as a block). The
// caller then re-lexes the table as a block.
//
// Appending a row to one <table>, though, makes the browser lay out the whole table again
// (column widths, collapsed borders and row heights are the table's, over all its cells), so
// the table's layout would still grow with it. Once its body holds CHUNK_ROWS finished rows,
// its column widths are kept: measured once (the browser's own widths for the rows so far,
// with some room to grow where the answer's column has it), they go into a <colgroup> of the
// table, which gets a fixed layout (`table-layout: fixed`: its rows no longer decide its
// columns), inside a <div class="md-table"> that scrolls it sideways. Later rows go into
// further tables of at most CHUNK_ROWS rows each, after it in that <div>, with the same
// <colgroup>: each is laid out by itself, so a frame lays out the last one only. The style
// sheet joins them into what looks like one table (no gap, one border between them, the
// header once). A later cell wider than its column wraps instead of widening it. finish()
// leaves them as they are: one table of all the rows would cost one layout of all of them
// and change the columns' widths under the reader's eyes.

const MAY_END =
  /^(?: {4}|\t| {0,3}(?:#|>|`{3}|~{3}|<|[-+*](?:[ \t]|$)|\d{1,9}[.)](?:[ \t]|$)|[-*_ \t]*$))/;

// Rows per table once the columns' widths are kept (the first table may hold more).
export const CHUNK_ROWS = 32;
// How much wider than the browser made it for the first rows a kept column may be, where
// the answer has the room (later rows' cells tend to be somewhat wider than the first ones').
const GROWTH = 1.5;

export class OpenTable {
  /**
   * @param table the table's rendered <table> element, in the document
   * @param start offset of the table's source in the answer; it runs to the answer's end
   * @param text the answer so far
   * @param renderRow (head, line) => a fragment holding the <tr> (and the white space after
   *   it) of the table `head` + `line` when that is one table of one row, else null
   */
  static open(table, start, text, renderRow) {
    const second = text.indexOf("\n", text.indexOf("\n", start) + 1);
    if (second === -1 || text.endsWith("\n\n")) return null;
    const rows = table.tBodies[0]?.rows ?? [];
    const lines = text.slice(second + 1).split("\n");
    const partial = lines.pop();
    if (rows.length !== lines.length + (partial === "" ? 0 : 1)) return null;
    return new OpenTable(table, text.slice(start, second + 1), text, rows, partial, renderRow);
  }

  constructor(table, head, text, rows, partial, renderRow) {
    this.table = table; // the last table: the one new rows go into
    this.head = head; // the header line and the delimiter row, each ended by "\n"
    this.renderRow = renderRow;
    this.next = text.lastIndexOf("\n") + 1; // where the first row not yet final begins
    this.seen = text.length;
    this.partial = partial === "" ? null : rows[rows.length - 1]; // the unfinished row's <tr>
    this.finished = rows.length - (partial === "" ? 0 : 1); // finished rows in this.table
    this.columns = null; // the kept column widths (px), once the table is cut into tables
    this.lexed = 0; // characters lexed by the last extend() (what a frame costs)
  }

  /** Show `text` (the whole answer so far) with one DOM mutation (two or three where a new
   * table of rows starts); false if the table may have ended (nothing was changed then). */
  extend(text) {
    if (text.length === this.seen) return true;
    const lines = text.slice(this.next).split("\n");
    const partial = lines.pop();
    if (lines.some((line) => MAY_END.test(line))) return false;
    if (partial !== "" && MAY_END.test(partial)) return false;
    const nodes = [];
    let last = null;
    this.lexed = 0;
    for (const line of partial === "" ? lines : [...lines, partial]) {
      const row = this.renderRow(this.head, line); // [<tr>, the white space after it?]
      if (row === null) return false;
      this.lexed += this.head.length + line.length;
      nodes.push(...row);
      last = row;
    }
    if (this.finished >= CHUNK_ROWS && (this.columns !== null || this.#keepColumns())) {
      this.#startTable(nodes);
    } else if (this.partial !== null) {
      // The white space after the unfinished row stays: it follows the last new row.
      if (last !== null && last.length > 1 && this.partial.nextSibling?.nodeType === Node.TEXT_NODE) {
        nodes.pop();
      }
      this.partial.replaceWith(...nodes);
    } else if (this.table.tBodies.length > 0) {
      this.table.tBodies[0].append(...nodes);
    } else if (nodes.length > 0) {
      const body = document.createElement("tbody");
      body.append(...nodes);
      this.table.append(body);
    }
    this.partial = partial === "" ? null : last[0];
    this.finished += lines.length;
    this.next = text.length - partial.length;
    this.seen = text.length;
    return true;
  }

  // Keeps the columns' widths from now on (see the module doc): the first table gets them,
  // inside a <div class="md-table">. Layout is clean here (an update runs before the frame's
  // layout), so the widths read are the last frame's. False, and nothing changed, where the
  // table has no laid-out header row (hidden, say): it then stays one table.
  #keepColumns() {
    const header = this.table.tHead?.rows[0];
    const widths = header ? [...header.cells].map((cell) => cell.getBoundingClientRect().width) : [];
    const width = header?.getBoundingClientRect().width ?? 0;
    if (widths.length === 0 || widths.some((w) => !(w > 0)) || !(width > 0)) return false;
    const room = this.table.parentElement.clientWidth;
    const scale = Math.min(GROWTH, Math.max(1, room / width));
    this.columns = { widths: widths.map((w) => w * scale), width: width * scale };
    const group = document.createElement("div");
    group.className = "md-table";
    this.table.replaceWith(group);
    group.append(this.#fix(this.table));
    return true;
  }

  // This update's rows (`nodes`) start a new table after the last one, with the kept columns;
  // the unfinished row, if any, leaves the full one (they replace it).
  #startTable(nodes) {
    // The table before the full one has not changed since at least the last frame: it may
    // be skipped while out of view (style.css), its size kept from its layout (read before
    // this update changes anything, so it is the last frame's).
    const full = this.table.parentElement;
    const settled = full.previousElementSibling;
    const height = settled?.getBoundingClientRect().height;
    if (this.partial !== null) {
      if (this.partial.nextSibling?.nodeType === Node.TEXT_NODE) this.partial.nextSibling.remove();
      this.partial.remove();
    }
    const table = document.createElement("table");
    const body = document.createElement("tbody");
    body.append(...nodes);
    table.append(body);
    full.after(this.#fix(table));
    if (settled) {
      settled.style.containIntrinsicSize = `auto ${height}px`;
      settled.classList.add("settled");
    }
    this.table = table;
    this.finished = 0;
  }

  // The kept columns for `table`: a <colgroup> of their widths and the table's width (the
  // style sheet gives tables in a .md-table the fixed layout that keeps them).
  #fix(table) {
    const colgroup = document.createElement("colgroup");
    for (const width of this.columns.widths) {
      const col = document.createElement("col");
      col.style.width = `${width}px`;
      colgroup.append(col);
    }
    table.prepend(colgroup);
    table.style.width = `${this.columns.width}px`;
    const rows = document.createElement("div");
    rows.className = "md-rows";
    rows.append(table);
    return rows;
  }
}
