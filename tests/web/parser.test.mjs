// The SSE parser of tokenspout.js (WHATWG HTML 9.2.6), run with `node --test`.
// Each stream is fed whole and split at every possible point: the events must not change.
import assert from "node:assert/strict";
import { test } from "node:test";

import { SSEDecoder, SSEParser, streamIdOf } from "../../src/tokenspout/web/tokenspout.js";

const encoder = new TextEncoder();

/** All events of `bytes` fed in the given pieces (split points are byte offsets). */
function decode(bytes, splits = []) {
  const decoder = new SSEDecoder();
  const events = [];
  let start = 0;
  for (const at of [...splits, bytes.length]) {
    events.push(...decoder.push(bytes.subarray(start, at)));
    start = at;
  }
  events.push(...decoder.end());
  return events;
}

function everySplit(text, expected) {
  const bytes = encoder.encode(text);
  assert.deepEqual(decode(bytes), expected, "whole");
  for (let i = 0; i <= bytes.length; i++) {
    assert.deepEqual(decode(bytes, [i]), expected, `split at byte ${i}`);
  }
  const oneByOne = Array.from({ length: bytes.length }, (_, i) => i);
  assert.deepEqual(decode(bytes, oneByOne), expected, "one byte at a time");
}

const message = (data, id = "") => ({ type: "message", data, id });

test("data events with ids, as tokenspout sends them", () => {
  everySplit('id: s1:0\ndata: {"token": "Hi"}\n\nid: s1:1\ndata: [DONE]\n\n', [
    message('{"token": "Hi"}', "s1:0"),
    message("[DONE]", "s1:1"),
  ]);
});

test("UTF-8 split across chunks decodes without U+FFFD", () => {
  const text = "data: 日本語 😀👍🏽 é\n\n";
  everySplit(text, [message("日本語 😀👍🏽 é")]);
});

test("CR, LF and CRLF all end lines, a CRLF split across chunks included", () => {
  const expected = [message("a\nb"), message("c"), message("d")];
  everySplit("data: a\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\n", expected);
  everySplit("data: a\rdata: b\r\rdata: c\n\ndata: d\r\n\r\n", expected);
});

test("field parsing: one optional space, comments, no colon, unknown fields", () => {
  everySplit(": ping\n\ndata:no space\ndata:  two spaces\nfoo: bar\ndata\n\n", [
    message("no space\n two spaces\n"),
  ]);
});

test("event type, retry, and ids that persist across events", () => {
  const parser = new SSEParser();
  const events = parser.push("event: error\nid: x:3\nretry: 2500\ndata: e\n\ndata: f\n\n");
  assert.deepEqual(events, [
    { type: "error", data: "e", id: "x:3" },
    message("f", "x:3"),
  ]);
  assert.equal(parser.retry, 2500);
  parser.push("retry: soon\nid: bad\0id\n\n");
  assert.equal(parser.retry, 2500, "a non-numeric retry is ignored");
  assert.equal(parser.lastEventId, "x:3", "an id with NUL is ignored");
});

test("an event without its blank line at the end of the stream is discarded", () => {
  everySplit("data: whole\n\ndata: cut off", [message("whole")]);
});

test("a leading BOM is ignored", () => {
  everySplit("\uFEFFdata: x\n\n", [message("x")]);
});

test("streamIdOf takes the stream id from an event id", () => {
  assert.equal(streamIdOf("abc123:42"), "abc123");
  assert.equal(streamIdOf("no-position"), null);
});
