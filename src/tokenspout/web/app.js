// The chat page: sends a conversation, renders the answer as Markdown as it streams,
// measures what the person sees (network TTFT, first paint, rate, total) and reports it to
// /v1/telemetry. The conversation is kept for the tab in sessionStorage and sent only to
// this server, with each request.
//
// Model text reaches the page only through markdown.js (Markdown rendered with raw HTML
// escaped, then sanitised into DOM nodes) or Text nodes: a model that writes
// <img onerror=...> shows those characters.

import { enableCopyButtons, MarkdownView } from "/static/markdown.js";
import { complete, reportTelemetry, stream } from "/static/tokenspout.js";

const $ = (id) => document.getElementById(id);
// A frame this much longer than 1/60 s is one the person may see as a stutter.
const LONG_FRAME_MS = 50;
// The telemetry label of each transport ("sse" as in the server's own request metrics).
const TELEMETRY_LABEL = { fetch: "sse", eventsource: "eventsource", websocket: "websocket" };
const TRANSPORT_NAME = { fetch: "SSE (fetch)", eventsource: "EventSource", websocket: "WebSocket" };
const STORAGE_KEY = "tokenspout.conversation";

/** Renders the answer's text at most once per animation frame (one DOM mutation each). */
class FrameRenderer {
  constructor(element) {
    this.view = new MarkdownView(element);
    this.text = ""; // the whole answer so far, line ends normalised to \n
    this.endsWithCR = false;
    this.dirty = false;
    this.frame = 0;
    this.firstPaint = null; // performance.now() just after the first text was painted
  }

  push(text) {
    // A CRLF may be split between two pushes: its LF was already counted as a line end.
    if (this.endsWithCR && text.startsWith("\n")) {
      text = text.slice(1);
      this.endsWithCR = false;
    }
    if (text === "") return;
    this.endsWithCR = text.endsWith("\r");
    this.text += text.replace(/\r\n?/g, "\n");
    this.dirty = true;
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.#flush());
  }

  #flush() {
    this.frame = 0;
    if (!this.dirty) return;
    this.dirty = false;
    this.view.update(this.text);
    // rAF callbacks run before the frame's paint; a task queued now runs after it.
    if (this.firstPaint === null) setTimeout(() => (this.firstPaint ??= performance.now()));
  }

  /** The answer is complete: resolves once all of it is rendered (as a one-shot render of
   * it would be) and painted. */
  drain() {
    return new Promise((resolve) => {
      requestAnimationFrame(() => {
        if (this.frame !== 0) cancelAnimationFrame(this.frame);
        this.#flush();
        this.view.finish();
        setTimeout(resolve);
      });
    });
  }
}

/** Counts long frames while an answer is on its way (a rAF loop, stopped at the end). */
class FrameMonitor {
  constructor() {
    this.longFrames = 0;
    this.running = true;
    this.last = performance.now();
    requestAnimationFrame((t) => this.#tick(t));
  }

  #tick(now) {
    if (!this.running) return;
    if (now - this.last > LONG_FRAME_MS) this.longFrames++;
    this.last = now;
    requestAnimationFrame((t) => this.#tick(t));
  }

  stop() {
    this.running = false;
    return this.longFrames;
  }
}

/** One answer column: its text, status line and stats panel. */
class AnswerView {
  constructor(container, label, kind) {
    const node = $("answer-template").content.firstElementChild.cloneNode(true);
    node.dataset.kind = kind;
    node.querySelector(".label").textContent = label;
    container.append(node);
    this.node = node;
    this.renderer = new FrameRenderer(node.querySelector(".text"));
    this.status("waiting for the first token…");
  }

  status(text) {
    this.node.querySelector(".status").textContent = text;
  }

  stat(name, text) {
    this.node.querySelector(`[data-stat="${name}"]`).textContent = text;
  }

  /** Fill the panel; times are ms since the request started. */
  showTimes({ ttft, paint, total, rate, unit }) {
    const ms = (v) => (v == null ? "–" : `${Math.round(v)} ms`);
    this.stat("ttft", ms(ttft));
    this.stat("paint", ms(paint));
    this.stat("total", ms(total));
    this.stat("rate-unit", unit);
    this.stat("rate", rate == null ? "–" : rate.toFixed(1));
  }
}

const history = loadHistory(); // this tab's conversation: {role, content} messages
const running = new Set(); // Generations and AbortControllers that Stop acts on
let apiKey = null;

function settings() {
  const number = (id) => (($(id).value === "") ? null : Number($(id).value));
  return {
    transport: $("transport").value,
    flushTokens: number("flush-tokens"),
    flushMs: number("flush-ms"),
    maxTokens: number("max-tokens"),
    temperature: number("temperature"),
    compare: $("compare").checked,
    apiKey,
  };
}

/** Report what the person saw (never the text) to the server's client_* metrics. An
 * answer that was stopped or failed has no complete time: `complete` is false, and its
 * first token and first paint (which were real) are reported alone. */
function sendTelemetry(transport, t, complete) {
  if (t.ttft == null || t.paint == null) return;
  const report = { transport, ttft_ms: t.ttft, first_paint_ms: t.paint, long_frames: t.longFrames };
  if (complete) report.complete_ms = t.total;
  reportTelemetry(report, { apiKey });
}

async function streamAnswer(view, request) {
  const monitor = new FrameMonitor();
  const gen = stream(request);
  // EventSource: the browser reconnects by itself after a drop, and resumes the stream.
  gen.onconnection = (connected) => {
    if (!connected) view.status("connection lost: reconnecting…");
    else view.status(gen.events > 0 ? "streaming…" : "waiting for the first token…");
  };
  running.add(gen);
  let error = null;
  try {
    for await (const text of gen) {
      if (gen.events === 1) view.status("streaming…");
      view.renderer.push(text);
    }
  } catch (err) {
    error = err;
  } finally {
    running.delete(gen);
    // A stopped EventSource stays open until the server names its stream (to cancel it):
    // its connection opening now must not overwrite the final status.
    gen.onconnection = null;
  }
  await view.renderer.drain();
  const start = gen.marks.start;
  const end = gen.marks.end ?? performance.now();
  const tokens = gen.usage?.completion_tokens;
  const streamed = end - (gen.marks.firstText ?? end);
  const amount = tokens ?? gen.chars;
  const times = {
    ttft: gen.marks.firstText && gen.marks.firstText - start,
    paint: view.renderer.firstPaint && view.renderer.firstPaint - start,
    total: end - start,
    rate: streamed > 0 ? (amount * 1000) / streamed : null,
    unit: tokens == null ? "chars/s" : "tokens/s",
    longFrames: monitor.stop(),
  };
  view.showTimes(times);
  view.status(error ? `error: ${error.message}` : `done (${gen.finishReason ?? "end of stream"})`);
  const complete = error === null && gen.finishReason !== "cancelled";
  sendTelemetry(TELEMETRY_LABEL[request.transport], times, complete);
  return view.renderer.text;
}

async function bufferedAnswer(view, request) {
  const monitor = new FrameMonitor();
  const abort = new AbortController();
  running.add(abort);
  const start = performance.now();
  view.status("waiting for the whole answer…");
  let text = "";
  try {
    // EventSource streams the last user message alone: the buffered twin asks the same way.
    const lastMessageOnly = request.transport === "eventsource";
    const answer = await complete({ ...request, lastMessageOnly, signal: abort.signal });
    text = answer.text;
    const arrived = performance.now();
    view.renderer.push(text);
    await view.renderer.drain();
    const times = {
      ttft: arrived - start,
      // An empty answer paints nothing: no first paint, and so no telemetry report.
      paint: view.renderer.firstPaint === null ? null : view.renderer.firstPaint - start,
      total: arrived - start,
      rate: null,
      unit: "tokens/s",
      longFrames: monitor.stop(),
    };
    view.showTimes(times);
    view.status("done");
    sendTelemetry("buffered", times, true);
  } catch (err) {
    monitor.stop();
    // Stop abandons the request (the server then stops generating): not an error.
    view.status(abort.signal.aborted ? "stopped" : `error: ${err.message}`);
  } finally {
    running.delete(abort);
  }
  return text;
}

function loadHistory() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY) ?? "[]");
    return Array.isArray(saved) ? saved : [];
  } catch {
    return [];
  }
}

function saveHistory() {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(history));
}

function addTurn(prompt) {
  const turn = $("turn-template").content.firstElementChild.cloneNode(true);
  turn.querySelector(".user").textContent = prompt;
  $("log").append(turn);
  return turn;
}

/** Show the conversation kept in sessionStorage (after a reload of the tab). */
function showHistory() {
  let turn = null;
  for (const message of history) {
    if (message.role === "user") turn = addTurn(message.content);
    else if (turn !== null) {
      const view = new AnswerView(turn.querySelector(".answers"), "Answer", "streamed");
      view.renderer.push(message.content);
      view.renderer.drain();
      view.status("from earlier in this tab");
    }
  }
}

async function ask(prompt) {
  const s = settings();
  const turn = addTurn(prompt);
  const answers = turn.querySelector(".answers");
  history.push({ role: "user", content: prompt });
  const request = { ...s, messages: [...history] };
  const jobs = [];
  if (s.compare) {
    answers.classList.add("compare");
    jobs.push(bufferedAnswer(new AnswerView(answers, "Buffered (stream: false)", "buffered"), request));
  }
  const streamed = streamAnswer(new AnswerView(answers, `Streamed · ${TRANSPORT_NAME[s.transport]}`, "streamed"), request);
  jobs.push(streamed);
  turn.scrollIntoView({ block: "end" });
  await Promise.allSettled(jobs);
  const answer = await streamed;
  if (answer === "") {
    // No answer came (refused, failed, or stopped before any text): the turn leaves the
    // conversation, or every later request would resend it, and an oversize message would
    // make them all fail. It stays on the page, marked.
    history.pop();
    turn.classList.add("unanswered");
  } else {
    history.push({ role: "assistant", content: answer });
  }
  saveHistory();
}

/** Ask the last question again: its answer leaves the conversation and the page. */
async function regenerate() {
  if (history.at(-1)?.role !== "assistant") return;
  history.pop();
  const prompt = history.pop().content;
  // The unanswered turns after it are not in the conversation either (a reload drops them).
  while ($("log").lastElementChild?.classList.contains("unanswered")) $("log").lastElementChild.remove();
  $("log").lastElementChild?.remove();
  await ask(prompt);
}

function newConversation() {
  history.length = 0;
  sessionStorage.removeItem(STORAGE_KEY);
  $("log").replaceChildren();
  updateButtons();
}

function stopAll() {
  // Generations cancel on the server; a buffered request can only be abandoned.
  for (const job of running) {
    if (job instanceof AbortController) job.abort();
    else job.stop();
  }
}

async function showEngine() {
  const health = await (await fetch("/health")).json();
  $("model").textContent = health.model;
  $("synthetic").hidden = !health.synthetic;
}

let busy = false;

function updateButtons() {
  const focused = document.activeElement;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || history.at(-1)?.role !== "assistant";
  $("new-conversation").disabled = busy || history.length === 0;
  // A focused button that is disabled drops the focus to <body> (Stop pressed from the
  // keyboard, once the answer ended): it goes to the prompt, where the next message is typed.
  if (focused instanceof HTMLButtonElement && focused.disabled) $("prompt").focus();
}

/** Run one exchange with the buttons showing that an answer is on its way. */
async function exchange(work) {
  if (busy) return;
  busy = true;
  updateButtons();
  // #log is a live region that changes every frame while an answer streams: busy, screen
  // readers wait and announce the answer once it is whole.
  $("log").setAttribute("aria-busy", "true");
  try {
    await work();
  } finally {
    busy = false;
    $("log").removeAttribute("aria-busy");
    updateButtons();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (prompt === "" || busy) return;
  $("prompt").value = "";
  exchange(() => ask(prompt));
});
$("regenerate").addEventListener("click", () => exchange(regenerate));
$("new-conversation").addEventListener("click", newConversation);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", stopAll);
// The key is kept for this tab only (sessionStorage, never localStorage): closing the tab
// forgets it. It goes in an Authorization header (a WebSocket: ?api_key=); telemetry
// reports carry timings only, never the key or any text.
const KEY_ITEM = "tokenspout.apiKey";
apiKey = sessionStorage.getItem(KEY_ITEM);
$("api-key").value = apiKey ?? "";
$("api-key").addEventListener("change", () => {
  apiKey = $("api-key").value || null;
  if (apiKey) sessionStorage.setItem(KEY_ITEM, apiKey);
  else sessionStorage.removeItem(KEY_ITEM);
});
enableCopyButtons($("log"));
showHistory();
updateButtons();
showEngine().catch(() => ($("model").textContent = "server unreachable"));
