// The live dashboard: polls /dashboard/data once a second and plots the last minutes on
// plain canvases (six charts of a few lines each do not need a charting library).
//
// The server sends cumulative counters and histograms, as /metrics has them; rates come
// from consecutive snapshots, percentiles from the histogram's growth over the last
// PERCENTILE_WINDOW_S, the way Prometheus' histogram_quantile(rate(...)) computes them.
// A server restart (a new `instance`) starts the differences over.

const WINDOW_S = 300;
const PERCENTILE_WINDOW_S = 10;
const REFRESH_MS = 1000;
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c"];

/** name -> { series: Map(label -> [[t, value | null]]), unit } */
const charts = new Map();
const restartsAt = []; // times of restarts, drawn as markers
let snapshots = []; // recent {time, data} of the current server instance
let instance = null;
let samples = 0;
let restarts = 0;
let firstSampleAt = null; // this browser's clock

for (const figure of document.querySelectorAll("[data-chart]")) {
  charts.set(figure.dataset.chart, { figure, series: new Map() });
}

/** The q-quantile of the observations a cumulative histogram gained since `before`. */
function quantile(q, now, before) {
  if (!now || now.le.length === 0) return null;
  const base = before && before.le.length === now.le.length ? before : null;
  const count = now.count - (base ? base.count : 0);
  if (count <= 0) return null;
  const rank = q * count;
  let previous = 0;
  for (let i = 0; i < now.le.length; i++) {
    const cumulative = now.cumulative[i] - (base ? base.cumulative[i] : 0);
    if (cumulative >= rank) {
      const lower = i === 0 ? 0 : now.le[i - 1];
      const share = cumulative === previous ? 1 : (rank - previous) / (cumulative - previous);
      return lower + (now.le[i] - lower) * share;
    }
    previous = cumulative;
  }
  return now.le.at(-1); // in the +Inf bucket: the largest finite bound, as Prometheus does
}

function add(chart, label, time, value) {
  const series = charts.get(chart).series;
  if (!series.has(label)) series.set(label, []);
  series.get(label).push([time, value]);
}

/** A gap in every line (the server did not answer). */
function addGap(time) {
  for (const { series } of charts.values()) {
    for (const points of series.values()) points.push([time, null]);
  }
}

function record(data) {
  // Plotted on this browser's clock; rates and windows use the server's.
  const time = Date.now() / 1000;
  const serverTime = data.time;
  if (data.instance !== instance) {
    if (instance !== null) {
      restarts += 1;
      restartsAt.push(time);
    }
    instance = data.instance;
    snapshots = [];
  }
  const previous = snapshots.at(-1);
  const windowStart = snapshots.find((s) => s.time >= serverTime - PERCENTILE_WINDOW_S - 0.5);
  snapshots.push({ time: serverTime, data });
  snapshots = snapshots.filter((s) => s.time >= serverTime - PERCENTILE_WINDOW_S - 2);

  const h = data.histograms;
  const old = windowStart?.data.histograms ?? {};
  // Without an earlier snapshot (the first sample, or the first after a restart) the
  // growth in the window is unknown: the all-time histogram is no stand-in for it.
  const inMs = (q, name) => {
    if (windowStart === undefined) return null;
    const v = quantile(q, h[name], old[name]);
    return v == null ? null : v * 1000;
  };
  add("latency", "server TTFT p50", time, inMs(0.5, "ttft"));
  add("latency", "server TTFT p95", time, inMs(0.95, "ttft"));
  add("latency", "browser TTFT p50", time, inMs(0.5, "client_ttft"));
  add("latency", "browser TTFT p95", time, inMs(0.95, "client_ttft"));
  add("latency", "first paint p50", time, inMs(0.5, "client_first_paint"));
  for (const q of [0.5, 0.95, 0.99]) {
    add("itl", `p${Math.round(q * 100)}`, time, inMs(q, "itl"));
  }
  const seconds = previous ? serverTime - previous.data.time : 0;
  const rate = (now, before) => (seconds > 0 ? Math.max(0, now - before) / seconds : null);
  add("throughput", "tokens/s", time,
      previous ? rate(data.counters.generation_tokens, previous.data.counters.generation_tokens) : null);
  add("requests", "running", time, data.gauges.running);
  add("requests", "waiting", time, data.gauges.waiting);
  add("streams", "open streams", time, data.gauges.streams);
  for (const [reason, count] of Object.entries(data.aborts)) {
    add("aborts", reason, time, previous ? rate(count, previous.data.aborts[reason] ?? 0) : null);
  }
  for (const { series } of charts.values()) {
    for (const points of series.values()) {
      while (points.length > 0 && points[0][0] < time - WINDOW_S) points.shift();
    }
  }
}

function format(value) {
  if (value == null) return "–";
  if (value >= 100) return Math.round(value).toString();
  return value.toFixed(value >= 10 ? 1 : 2);
}

function draw(name, now) {
  const { figure, series } = charts.get(name);
  const canvas = figure.querySelector("canvas");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const left = 44;
  const bottom = height - 18;
  // The axis grows with the data from one minute up to WINDOW_S.
  const span = Math.min(WINDOW_S, Math.max(60, now - (firstSampleAt ?? now)));
  const x = (t) => left + ((t - (now - span)) / span) * (width - left - 6);
  let top = 0;
  for (const points of series.values()) {
    for (const [, v] of points) if (v != null && v > top) top = v;
  }
  top = top > 0 ? top * 1.1 : 1;
  const y = (v) => bottom - (v / top) * (bottom - 6);

  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#5f6b7a";
  g.strokeStyle = "#dde2e8";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    g.beginPath();
    g.moveTo(left, y(v));
    g.lineTo(width - 6, y(v));
    g.stroke();
    g.fillText(format(v), 2, y(v) + 4);
  }
  g.fillText(span >= 120 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`, left, height - 4);
  g.fillText("now", width - 28, height - 4);
  g.setLineDash([4, 3]);
  g.strokeStyle = "#c92a2a";
  for (const t of restartsAt) {
    if (t < now - span) continue;
    g.beginPath();
    g.moveTo(x(t), 6);
    g.lineTo(x(t), bottom);
    g.stroke();
  }
  g.setLineDash([]);

  const legend = [];
  let colour = 0;
  for (const [label, points] of series) {
    const color = COLORS[colour++ % COLORS.length];
    g.strokeStyle = color;
    g.lineWidth = 1.75;
    g.beginPath();
    let drawing = false;
    for (const [t, v] of points) {
      if (v == null) {
        drawing = false;
        continue;
      }
      if (drawing) g.lineTo(x(t), y(v));
      else g.moveTo(x(t), y(v));
      drawing = true;
    }
    g.stroke();
    // The latest sample's value, "–" when it has none: an older value would read as now.
    const latest = points.at(-1)?.[1];
    legend.push([label, color, latest]);
  }
  const items = legend.map(([label, color, latest]) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = color;
    item.append(swatch, `${label} ${format(latest)}`);
    item.dataset.series = label;
    item.dataset.value = latest ?? "";
    return item;
  });
  figure.querySelector(".legend").replaceChildren(...items);
}

function status(text, state) {
  const element = document.getElementById("status");
  element.textContent = text;
  element.dataset.state = state;
}

// With --metrics-api-key the data needs that key, as /metrics does: open the page as
// /dashboard?api_key=KEY, and the key goes with each request (the server's logs blank it).
const key = new URLSearchParams(location.search).get("api_key");
const DATA_URL = key === null ? "/dashboard/data" : `/dashboard/data?api_key=${encodeURIComponent(key)}`;

async function tick() {
  try {
    const response = await fetch(DATA_URL, { cache: "no-store" });
    if (response.status === 401) {
      status("this server's metrics need its metrics key: open /dashboard?api_key=KEY", "down");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    record(await response.json());
    samples += 1;
    firstSampleAt ??= Date.now() / 1000;
    const restarted = restarts > 0 ? ` · restarted ${restarts}×` : "";
    status(`live${restarted}`, "live");
  } catch {
    addGap(Date.now() / 1000);
    status("server unreachable, retrying…", "down");
  }
  const now = Date.now() / 1000;
  for (const name of charts.keys()) draw(name, now);
  document.body.dataset.samples = samples;
  document.body.dataset.restarts = restarts;
  setTimeout(tick, REFRESH_MS);
}

tick();
