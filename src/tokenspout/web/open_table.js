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

const MAY_END =
  /^(?: {4}|\t| {0,3}(?:#|>|`{3}|~{3}|<|[-+*](?:[ \t]|$)|\d{1,9}[.)](?:[ \t]|$)|[-*_ \t]*$))/;

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
    this.table = table;
    this.head = head; // the header line and the delimiter row, each ended by "\n"
    this.renderRow = renderRow;
    this.next = text.lastIndexOf("\n") + 1; // where the first row not yet final begins
    this.seen = text.length;
    this.partial = partial === "" ? null : rows[rows.length - 1]; // the unfinished row's <tr>
    this.lexed = 0; // characters lexed by the last extend() (what a frame costs)
  }

  /** Show `text` (the whole answer so far) with one DOM mutation; false if the table may
   * have ended (nothing was changed then). */
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
    if (this.partial !== null) {
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
    this.next = text.length - partial.length;
    this.seen = text.length;
    return true;
  }
}
