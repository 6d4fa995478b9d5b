// tokenspout.js: a small browser client for tokenspout streams. No dependencies, no build.
//
//   import { stream } from "/static/tokenspout.js";
//   const generation = stream({ transport: "fetch", messages: [{ role: "user", content: "Hi" }] });
//   for await (const text of generation) output.append(text);
//   generation.marks;  // { start, open, firstText, end } in performance.now() milliseconds
//   generation.stop(); // stops generation on the server, not just this connection
//
// Transports: "fetch" (POST /v1/chat/completions, SSE read from a ReadableStream),
// "eventsource" (GET /v1/completions/stream; the browser reconnects by itself with
// Last-Event-ID and the server resumes the same stream), "websocket" (/v1/ws, one socket
// shared by every stream of the page).

const now = () => performance.now();

/** An error the server reported (HTTP status, error event, or WebSocket error message). */
export class StreamError extends Error {
  constructor(message, status = null) {
    super(message);
    this.name = "StreamError";
    this.status = status;
  }
}

// ---------------------------------------------------------------------------------------
// SSE parsing, per WHATWG HTML §9.2.6 "Interpreting an event stream".

/**
 * Text in, events out. Lines end at CRLF, LF or CR, and a CRLF may be split between two
 * pushes; a line may be split anywhere. Returns `{type, data, id}` objects.
 */
export class SSEParser {
  constructor() {
    this.partial = ""; // the unterminated tail of the last push
    this.skipLF = false; // the last push ended with CR: an LF first in the next one ends nothing
    this.started = false;
    this.type = "";
    this.data = [];
    this.lastEventId = ""; // persists across events, as EventSource's does
    this.retry = null;
  }

  /** Feed decoded text; returns the events it completed. */
  push(text) {
    let s = this.partial + text;
    if (!this.started && s.length > 0) {
      this.started = true;
      if (s.startsWith("\uFEFF")) s = s.slice(1); // one leading BOM is ignored
    }
    let i = 0;
    if (this.skipLF && s.length > 0) {
      if (s[0] === "\n") i = 1;
      this.skipLF = false;
    }
    const events = [];
    const ends = /[\r\n]/g;
    ends.lastIndex = i;
    for (let m = ends.exec(s); m !== null; m = ends.exec(s)) {
      this.line(s.slice(i, m.index), events);
      i = m.index + 1;
      if (m[0] === "\r") {
        if (i === s.length) this.skipLF = true;
        else if (s[i] === "\n") i += 1;
      }
      ends.lastIndex = i;
    }
    this.partial = s.slice(i);
    return events;
  }

  /** The stream ended: an event without its blank line is discarded (the spec says so). */
  end() {
    this.partial = "";
    this.type = "";
    this.data = [];
  }

  line(line, events) {
    if (line === "") {
      this.dispatch(events);
      return;
    }
    if (line[0] === ":") return; // a comment: heartbeats look like this
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }

  dispatch(events) {
    // An event with no data line is not dispatched, but its id still counts.
    if (this.data.length > 0) {
      events.push({ type: this.type || "message", data: this.data.join("\n"), id: this.lastEventId });
    }
    this.type = "";
    this.data = [];
  }
}

/** Bytes in, events out: UTF-8 decoded with `stream: true`, so a character split across
 * network chunks is decoded once its last byte arrives, never as U+FFFD. */
export class SSEDecoder {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.parser = new SSEParser();
  }

  push(bytes) {
    return this.parser.push(this.decoder.decode(bytes, { stream: true }));
  }

  end() {
    const events = this.parser.push(this.decoder.decode());
    this.parser.end();
    return events;
  }
}

/** The stream id inside an event id `<stream id>:<position>` (null if there is none). */
export function streamIdOf(eventId) {
  const colon = eventId ? eventId.lastIndexOf(":") : -1;
  return colon > 0 ? eventId.slice(0, colon) : null;
}

// ---------------------------------------------------------------------------------------
// Generations: one streamed answer, whatever the transport.

function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

function streamOptions(o) {
  const options = {};
  if (o.flushTokens != null) options.flush_tokens = o.flushTokens;
  if (o.flushMs != null) options.flush_ms = o.flushMs;
  return options;
}

function generationFields(o) {
  const fields = {};
  if (o.maxTokens != null) fields.max_tokens = o.maxTokens;
  if (o.temperature != null) fields.temperature = o.temperature;
  return fields;
}

/** The seed endpoint and /v1/completions take one prompt: the last user message. */
function lastUserText(messages) {
  const users = messages.filter((m) => m.role === "user");
  return (users.at(-1) ?? messages.at(-1)).content;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new StreamError(body.error?.message ?? response.statusText, response.status);
  } catch {
    return new StreamError(`HTTP ${response.status}`, response.status);
  }
}

/** Callbacks in, async iteration out (EventSource and WebSocket push their messages). */
class Channel {
  constructor() {
    this.items = [];
    this.closed = false;
    this.error = null;
    this.wake = null;
  }

  push(item) {
    if (this.closed) return;
    this.items.push(item);
    this.wakeUp();
  }

  close(error = null) {
    if (this.closed) return;
    this.closed = true;
    this.error = error;
    this.wakeUp();
  }

  wakeUp() {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  async *drain() {
    for (;;) {
      while (this.items.length > 0) yield this.items.shift();
      if (this.closed) {
        if (this.error) throw this.error;
        return;
      }
      await new Promise((resolve) => (this.wake = resolve));
    }
  }
}

/**
 * One streamed answer. Iterate it for text deltas (strings). While it runs:
 * `marks.start` (request sent), `marks.open` (response or socket open), `marks.firstText`
 * (first text received: network TTFT), `marks.end`; `events` and `chars` received;
 * `finishReason` and `usage` when the server sends them; `reconnects` (EventSource).
 * `onconnection(connected)`, if set, is called when the connection is lost and the browser
 * reconnects by itself (false), and when it is back (true) (EventSource).
 */
class Generation {
  constructor(options) {
    this.options = { baseUrl: "", ...options };
    this.transport = options.transport;
    this.streamId = null;
    this.finishReason = null;
    this.usage = null;
    this.events = 0;
    this.chars = 0;
    this.reconnects = 0;
    this.stopRequested = false;
    this.onconnection = null;
    this.marks = { start: now(), open: null, firstText: null, end: null };
  }

  async *[Symbol.asyncIterator]() {
    try {
      for await (const text of this.deltas()) {
        if (!text) continue;
        this.marks.firstText ??= now();
        this.events += 1;
        this.chars += text.length;
        yield text;
      }
    } finally {
      this.marks.end = now();
    }
  }

  /** Stop generating on the server; the iteration then ends (finishReason "cancelled"). */
  stop() {
    if (this.stopRequested) return;
    this.stopRequested = true;
    if (this.streamId) this.cancel();
  }

  /** Called once the server has named the stream: a stop requested earlier is sent now. */
  knowStreamId(id) {
    if (this.streamId || !id) return;
    this.streamId = id;
    if (this.stopRequested) this.cancel();
  }

  connectionChanged(connected) {
    this.onconnection?.(connected);
  }

  url(path) {
    return new URL(this.options.baseUrl + path, globalThis.location?.href);
  }
}

/** POST /v1/chat/completions; the SSE body read chunk by chunk from a ReadableStream. */
class FetchGeneration extends Generation {
  async *deltas() {
    const o = this.options;
    this.abort = new AbortController();
    const body = {
      messages: o.messages,
      ...generationFields(o),
      stream: true,
      stream_options: { include_usage: true, ...streamOptions(o) },
    };
    const response = await fetch(this.url("/v1/chat/completions"), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders(o.apiKey) },
      body: JSON.stringify(body),
      signal: this.abort.signal,
    });
    this.marks.open = now();
    if (!response.ok) throw await errorOf(response);
    this.knowStreamId(response.headers.get("X-Stream-Id"));
    const reader = response.body.getReader();
    const decoder = new SSEDecoder();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        const events = done ? decoder.end() : decoder.push(value);
        for (const event of events) {
          if (event.data === "[DONE]") return;
          yield this.chunkText(JSON.parse(event.data));
        }
        if (done) return;
      }
    } finally {
      // Leaving early (an error, or the caller stopped iterating) closes the connection,
      // which aborts a non-resumable generation on the server.
      reader.cancel().catch(() => {});
    }
  }

  chunkText(chunk) {
    if (chunk.error) throw new StreamError(chunk.error.message);
    if (chunk.usage) this.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (choice?.finish_reason) this.finishReason = choice.finish_reason;
    return choice?.delta?.content ?? "";
  }

  async cancel() {
    const o = this.options;
    try {
      const url = this.url(`/v1/streams/${encodeURIComponent(this.streamId)}/cancel`);
      const r = await fetch(url, { method: "POST", headers: authHeaders(o.apiKey) });
      // 404: the stream already ended. Anything else: fall back to dropping the connection.
      if (!r.ok && r.status !== 404) this.abort.abort();
    } catch {
      this.abort.abort();
    }
  }
}

/** Cancel attempts of an EventSource's stream, and the longest wait between two. */
const CANCEL_ATTEMPTS = 10;
const CANCEL_MAX_DELAY_MS = 4000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** GET /v1/completions/stream as an EventSource: resumable, so a dropped connection is
 * resumed by the browser's own reconnect (it sends Last-Event-ID; the server replays). */
class EventSourceGeneration extends Generation {
  async *deltas() {
    const o = this.options;
    const url = this.url("/v1/completions/stream");
    url.searchParams.set("prompt", lastUserText(o.messages));
    url.searchParams.set("chat", "true"); // through the chat template, as a chat request
    for (const [name, value] of Object.entries({ ...generationFields(o), ...streamOptions(o) })) {
      url.searchParams.set(name, String(value));
    }
    url.searchParams.set("resumable", "true");
    // Before any token the server sends `event: stream` with the stream's id (and its id at
    // position 0): Stop can cancel it while it is queued, and a reconnect resumes it.
    url.searchParams.set("stream_event", "true");
    // EventSource cannot set headers either: the server accepts the key as a GET parameter.
    if (o.apiKey) url.searchParams.set("api_key", o.apiKey);
    const channel = (this.channel = new Channel());
    const source = (this.source = new EventSource(url));
    source.onopen = () => {
      this.marks.open ??= now();
      this.connectionChanged(true);
    };
    source.addEventListener("stream", (event) => this.knowStreamId(event.data));
    source.onmessage = (event) => {
      if (event.data === "[DONE]") {
        source.close(); // or the browser would reconnect once the server closes
        channel.close();
        return;
      }
      const payload = JSON.parse(event.data);
      if (payload.error) channel.close(new StreamError(payload.error.message));
      else channel.push(payload.token);
    };
    source.onerror = () => {
      if (this.stopRequested) {
        // Stopped before the stream was named: a reconnect would start another generation.
        source.close();
      } else if (source.readyState === EventSource.CLOSED) {
        // EventSource does not expose the HTTP status or body of a refused request. Once the
        // stream was named, the refusal is of a reconnect: the server no longer has it.
        const message = this.streamId
          ? "the stream was lost (the server no longer has it, e.g. after a restart)"
          : "the server refused the stream (switch to fetch to see why)";
        channel.close(new StreamError(message));
      } else {
        this.reconnects += 1; // CONNECTING: the browser retries with Last-Event-ID
        this.connectionChanged(false);
      }
    };
    try {
      yield* channel.drain();
    } finally {
      // Stopped before the server named the stream: it stays open until the name comes (the
      // cancel then closes it), or nothing could cancel a stream that outlives it.
      if (!this.stopRequested || this.streamId) source.close();
    }
  }

  /** The iteration ends at once, cancelled; the server is told as soon as the id is known. */
  stop() {
    if (this.stopRequested) return;
    this.finishReason = "cancelled";
    super.stop();
    this.channel?.close();
  }

  async cancel() {
    this.source.close();
    const url = this.url(`/v1/streams/${encodeURIComponent(this.streamId)}/cancel`);
    // The stream is resumable: it outlives the closed EventSource (for the server's resume
    // grace period), so the cancel is retried through an outage or a restart, with backoff.
    // Any answer but a 5xx settles it (404: it ended already, or was lost).
    for (let attempt = 1, delay = 250; attempt <= CANCEL_ATTEMPTS; attempt++, delay *= 2) {
      try {
        const r = await fetch(url, { method: "POST", headers: authHeaders(this.options.apiKey) });
        if (r.status < 500) return;
      } catch {
        // the network or the server is down: try again
      }
      if (attempt < CANCEL_ATTEMPTS) await sleep(Math.min(delay, CANCEL_MAX_DELAY_MS));
    }
  }
}

/** One WebSocket per server, shared by every stream of the page; messages routed by id. */
class WebSocketLink {
  static links = new Map();
  static nextId = 1;

  static for(url) {
    const key = url.toString();
    if (!WebSocketLink.links.has(key)) WebSocketLink.links.set(key, new WebSocketLink(url));
    return WebSocketLink.links.get(key);
  }

  constructor(url) {
    this.url = url;
    this.socket = null;
    this.opening = null;
    this.routes = new Map(); // stream id -> function(message)
  }

  open() {
    if (this.opening) return this.opening;
    const socket = new WebSocket(this.url);
    this.opening = new Promise((resolve, reject) => {
      socket.onopen = () => resolve();
      socket.onerror = () => this.whyRefused().then(reject);
    });
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      this.routes.get(message.id)?.(message);
    };
    socket.onclose = (event) => {
      const error = { message: `the WebSocket closed (${event.code} ${event.reason})`.trim() };
      for (const route of this.routes.values()) route({ type: "error", error });
      this.routes.clear();
      this.opening = null;
    };
    this.socket = socket;
    return this.opening;
  }

  send(message) {
    this.socket.send(JSON.stringify(message));
  }

  /** Why the handshake failed, as far as a page can tell: a refused handshake reaches the
   * page as a bare `error` and a close with code 1006 (the WHATWG WebSocket API hides the
   * HTTP status), so the same key is tried on GET /v1/models, which the server checks as it
   * checks the handshake's. */
  async whyRefused() {
    const failed = "could not open the WebSocket";
    const key = this.url.searchParams.get("api_key");
    const models = new URL(this.url.pathname.replace(/\/v1\/ws$/, "/v1/models"), this.url);
    models.protocol = this.url.protocol === "wss:" ? "https:" : "http:";
    try {
      const r = await fetch(models, { headers: authHeaders(key) });
      if (r.status === 401) {
        return new StreamError(
          key ? `${failed}: the server refused the API key` : `${failed}: the server needs an API key`,
          401,
        );
      }
      return new StreamError(`${failed}: the server refused it, or a proxy did`);
    } catch {
      return new StreamError(`${failed}: the server is unreachable`);
    }
  }
}

/** /v1/ws: `generate`, then `delta`s and one `done` or `error`; `cancel` by id. */
class WebSocketGeneration extends Generation {
  async *deltas() {
    const o = this.options;
    const url = this.url("/v1/ws");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    // Browsers cannot set headers on a WebSocket: the server accepts the key as a parameter.
    if (o.apiKey) url.searchParams.set("api_key", o.apiKey);
    this.link = WebSocketLink.for(url);
    await this.link.open();
    this.marks.open = now();
    const id = `s${WebSocketLink.nextId++}`;
    const channel = new Channel();
    this.link.routes.set(id, (message) => {
      if (message.type === "delta") channel.push(message.text);
      else if (message.type === "done") {
        this.finishReason = message.finish_reason;
        this.usage = message.usage;
        channel.close();
      } else if (message.type === "error") channel.close(new StreamError(message.error.message));
    });
    this.link.send({
      type: "generate",
      id,
      messages: o.messages,
      ...generationFields(o),
      stream_options: streamOptions(o),
    });
    this.knowStreamId(id);
    try {
      yield* channel.drain();
    } finally {
      if (this.link.routes.delete(id) && !channel.closed) this.cancel(); // left early
    }
  }

  cancel() {
    if (this.link.socket.readyState === WebSocket.OPEN) this.link.send({ type: "cancel", id: this.streamId });
  }
}

const TRANSPORTS = { fetch: FetchGeneration, eventsource: EventSourceGeneration, websocket: WebSocketGeneration };

/**
 * Start a streamed answer. Options: `transport` ("fetch" | "eventsource" | "websocket"),
 * `messages` (chat messages; EventSource sends the last user message as the prompt),
 * `maxTokens`, `temperature`, `flushTokens`, `flushMs`, `apiKey`, `baseUrl` (default: this
 * page's server). Returns a Generation: iterate it for text.
 */
export function stream(options) {
  const Kind = TRANSPORTS[options.transport];
  if (!Kind) throw new TypeError(`unknown transport ${options.transport}`);
  return new Kind(options);
}

/**
 * The same request without streaming (`stream: false`, POST /v1/chat/completions): resolves
 * to `{text, usage, finishReason, marks: {start, end}}`. With `lastMessageOnly`, the last
 * user message alone is sent, as the EventSource transport streams it (one user message
 * through the chat template). `signal` aborts it (the server then stops generating: the
 * client left).
 */
export async function complete(options) {
  const o = { baseUrl: "", ...options };
  const start = now();
  const messages = o.lastMessageOnly ? [{ role: "user", content: lastUserText(o.messages) }] : o.messages;
  const body = { messages, ...generationFields(o), stream: false };
  const response = await fetch(new URL(o.baseUrl + "/v1/chat/completions", globalThis.location?.href), {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders(o.apiKey) },
    body: JSON.stringify(body),
    signal: o.signal,
  });
  if (!response.ok) throw await errorOf(response);
  const result = await response.json();
  const choice = result.choices[0];
  return {
    text: choice.message.content,
    usage: result.usage,
    finishReason: choice.finish_reason,
    marks: { start, end: now() },
  };
}

/** POST /v1/telemetry: perceived-latency numbers of one answer (never any text). */
export function reportTelemetry(report, { baseUrl = "", apiKey = null } = {}) {
  return fetch(new URL(baseUrl + "/v1/telemetry", globalThis.location?.href), {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders(apiKey) },
    body: JSON.stringify(report),
    keepalive: true, // still delivered if the page is closing
  }).catch(() => {});
}
