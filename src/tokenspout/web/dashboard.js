// The live dashboard: polls /dashboard/data once a second and plots the last minutes on
// plain canvases (six charts of a few lines each do not need a charting library).
//
// The server sends cumulative counters and histograms, as /metrics has them; rates come
// from consecutive snapshots, percentiles from the histogram's growth over the last
// PERCENTILE_WINDOW_S, the way Prometheus' histogram_quantile(rate(...)) computes them.
//
// Each snapshot names its server `instance`. Behind a load balancer each poll reaches one
// of several replicas, so snapshots are kept per instance, and differences are only taken
// between snapshots of the same one (each has its own counters; a restarted server is a
// new instance whose counters start at zero). What is plotted adds up the instances heard
// from in the last INSTANCE_WINDOW_S, as Prometheus' sum(rate(...)) over replicas would:
// their latest rates and gauges, and their histograms' growth for the percentiles.

const WINDOW_S = 300;
const PERCENTILE_WINDOW_S = 10;
// Long enough that round-robin polls reach each of a few replicas within it.
const INSTANCE_WINDOW_S = 10;
// An instance not heard from for this long is forgotten (its snapshots are no baseline).
const FORGET_S = 60;
const REFRESH_MS = 1000;
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c"];

/** name -> { series: Map(label -> [[t, value | null]]), unit } */
const charts = new Map();
/** instance id -> { snapshots: recent [{time, data}], seenAt, latest, rates, growth } */
const instances = new Map();
const newInstancesAt = []; // times an instance started while the page watched: markers
let samples = 0;
let firstSampleAt = null; // this browser's clock
let lastFailureAt = -Infinity; // the last poll that got no answer (this browser's clock)

for (const figure of document.querySelectorAll("[data-chart]")) {
  charts.set(figure.dataset.chart, { figure, series: new Map() });
}

/** What a cumulative histogram gained since `before` (all of it without a comparable one). */
function growth(before, now) {
  const base = before && before.le.length === now.le.length ? before : null;
  return {
    le: now.le,
    cumulative: now.cumulative.map((c, i) => c - (base ? base.cumulative[i] : 0)),
    count: now.count - (base ? base.count : 0),
  };
}

/** Several instances' growth as one histogram (the same server has the same buckets). */
function merge(parts) {
  const grown = parts.filter((h) => h && h.count > 0);
  if (grown.length === 0) return null;
  const { le } = grown[0];
  const same = grown.filter((h) => h.le.length === le.length);
  return {
    le,
    cumulative: le.map((_, i) => same.reduce((sum, h) => sum + h.cumulative[i], 0)),
    count: same.reduce((sum, h) => sum + h.count, 0),
  };
}

/** The q-quantile of the observations in a histogram's growth. */
function quantile(q, h) {
  if (!h || h.le.length === 0 || h.count <= 0) return null;
  const rank = q * h.count;
  let previous = 0;
  for (let i = 0; i < h.le.length; i++) {
    const cumulative = h.cumulative[i];
    if (cumulative >= rank) {
      const lower = i === 0 ? 0 : h.le[i - 1];
      const share = cumulative === previous ? 1 : (rank - previous) / (cumulative - previous);
      return lower + (h.le[i] - lower) * share;
    }
    previous = cumulative;
  }
  return h.le.at(-1); // in the +Inf bucket: the largest finite bound, as Prometheus does
}

/** Per-second rates between two snapshots of one instance. */
function ratesBetween(before, now) {
  const seconds = now.time - before.time;
  const rate = (a, b) => (seconds > 0 ? Math.max(0, a - b) / seconds : null);
  const aborts = {};
  for (const [reason, count] of Object.entries(now.aborts)) {
    aborts[reason] = rate(count, before.aborts[reason] ?? 0);
  }
  return { tokens: rate(now.counters.generation_tokens, before.counters.generation_tokens), aborts };
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

/** Keep the snapshot in its instance's history; its rates and windowed growth from there. */
function remember(data, time) {
  let instance = instances.get(data.instance);
  if (instance === undefined) {
    // One not seen in the first rounds of polls, or after an outage, started meanwhile (a
    // restart or a new replica); the others are the replicas there from the start.
    const watching = firstSampleAt !== null;
    if (watching && (time - firstSampleAt > INSTANCE_WINDOW_S || lastFailureAt > firstSampleAt)) {
      newInstancesAt.push(time);
    }
    instance = { snapshots: [] };
    instances.set(data.instance, instance);
  }
  const previous = instance.snapshots.at(-1);
  const since = data.time - PERCENTILE_WINDOW_S;
  const windowStart = instance.snapshots.find((s) => s.time >= since - 0.5);
  instance.snapshots.push({ time: data.time, data });
  instance.snapshots = instance.snapshots.filter((s) => s.time >= since - 2);
  instance.seenAt = time;
  instance.latest = data;
  instance.rates = previous ? ratesBetween(previous.data, data) : null;
  // Without an earlier snapshot (an instance's first) the growth in the window is unknown:
  // the all-time histogram is no stand-in for it.
  instance.growth = {};
  if (windowStart !== undefined) {
    const old = windowStart.data.histograms;
    for (const [name, h] of Object.entries(data.histograms)) {
      instance.growth[name] = growth(old[name], h);
    }
  }
  for (const [id, { seenAt }] of instances) if (seenAt < time - FORGET_S) instances.delete(id);
}

/** The instances that count now: heard from lately, and since the last outage (a server
 * that was down and answers again with a new id was restarted: the old one is gone). */
function liveInstances(time) {
  return [...instances.values()].filter(
    (i) => i.seenAt > lastFailureAt && i.seenAt >= time - INSTANCE_WINDOW_S,
  );
}

/** The sum over every instance, or null unless each has a value (a partial sum is no total). */
function total(values) {
  return values.some((v) => v == null) ? null : values.reduce((a, b) => a + b, 0);
}

function record(data) {
  // Plotted on this browser's clock; rates and windows use each server's.
  const time = Date.now() / 1000;
  remember(data, time);
  const live = liveInstances(time);
  const inMs = (q, name) => {
    const v = quantile(q, merge(live.map((i) => i.growth[name])));
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
  add("throughput", "tokens/s", time, total(live.map((i) => i.rates?.tokens)));
  add("requests", "running", time, total(live.map((i) => i.latest.gauges.running)));
  add("requests", "waiting", time, total(live.map((i) => i.latest.gauges.waiting)));
  add("streams", "open streams", time, total(live.map((i) => i.latest.gauges.streams)));
  const reasons = new Set(live.flatMap((i) => Object.keys(i.latest.aborts)));
  for (const reason of reasons) {
    const rates = live.map((i) => (i.rates ? (i.rates.aborts[reason] ?? 0) : null));
    add("aborts", reason, time, total(rates));
  }
  for (const { series } of charts.values()) {
    for (const points of series.values()) {
      while (points.length > 0 && points[0][0] < time - WINDOW_S) points.shift();
    }
  }
  return live.length;
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
  for (const t of newInstancesAt) {
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
    const live = record(await response.json());
    samples += 1;
    firstSampleAt ??= Date.now() / 1000;
    const summed = live > 1 ? " (each chart adds them up)" : "";
    status(`live · ${live} instance${live > 1 ? "s" : ""}${summed}`, "live");
    document.body.dataset.instances = live;
  } catch {
    lastFailureAt = Date.now() / 1000;
    addGap(lastFailureAt);
    status("server unreachable, retrying…", "down");
  }
  const now = Date.now() / 1000;
  for (const name of charts.keys()) draw(name, now);
  document.body.dataset.samples = samples;
  document.body.dataset.newInstances = newInstancesAt.length;
  setTimeout(tick, REFRESH_MS);
}

tick();
