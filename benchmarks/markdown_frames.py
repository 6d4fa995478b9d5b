"""Frame cost of the page's Markdown renderer while a long answer streams, in headless
Chromium (Debian's /usr/bin/chromium, as the browser tests use), side by side with an older
renderer.

The page's own ``MarkdownView`` (``/static/markdown.js``, inside the page's answer markup
and styles) is fed ``--tokens`` word-sized tokens at ``--rate`` tokens/s by a timer in the
page, and renders at most once per animation frame, as the chat page does. Per frame it
records:

* the frame's work: from the animation-frame callback (where the renderer runs) to a task
  posted from it, which runs once the browser has done that frame's style, layout and
  paint. A frame whose work is over 16 ms cannot keep 60 Hz;
* the renderer's own time (lex, render, sanitise, the DOM update) and what it lexed;
* Chromium's long animation frames (``long-animation-frame`` entries, over 50 ms);
* per frame, in the first and the last quarter of the answer: the CPU time of the page's
  renderer process and of its main thread, and the time in style and layout (Chromium's
  own counters). CPU time hardly depends on how many other jobs share the cores, frame
  times do: on a loaded machine, whether a frame's work grows with the answer shows here.

Four answers: mixed Markdown (headings, lists, tables, code blocks: the usual case), one
code block, one paragraph (no blank line: the last block is the whole answer), one table.
Each runs with the renderer of this checkout ("new") and with the renderer of ``--baseline``
(a commit: its ``web/*.js`` modules served from ``git show``, with this checkout's style
sheet and vendored libraries: "old"), one after the other, so both see the same machine
load; the load average is printed with each row.

    .venv/bin/python benchmarks/markdown_frames.py --tokens 5000 --rate 100
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from harness import ServerProcess, free_port, machine, tokenspout_serve

# The renderer measured in RESULTS.md before tables and long paragraphs were streamed as
# appended rows and line blocks.
BASELINE = "dbccd50"
WEB = "src/tokenspout/web"
LONG_FRAME_MS = 16.0

MIXED = """## Section {n}

Some *emphasis*, **strong text**, `inline code` and a [link](https://example.com/{n}).
This paragraph goes on for a while so that it is a realistic size for an answer.

- a first point about item {n}
- a second point, with `code`
- a third point

```python
def step_{n}(values: list[int]) -> int:
    total = 0
    for value in values:
        total += value * {n}
    return total
```

| column | value |
| ------ | ----- |
| n      | {n}   |

"""

FEED = """async ([module, tokens, rate]) => {
  window.__done = false;
  window.__updates = 0;
  window.__at = 0;
  const { MarkdownView } = await import(module);
  const section = document.createElement("section");
  section.className = "answer";
  const text = document.createElement("div");
  text.className = "text";
  section.append(text);
  document.getElementById("log").append(section);
  const view = new MarkdownView(text);
  const longFrames = [];
  const observer = new PerformanceObserver((list) => longFrames.push(...list.getEntries()));
  observer.observe({ type: "long-animation-frame" });
  // The frame's work ends when a task posted from its animation-frame callback runs: after
  // the browser's style, layout and paint of that frame.
  const channel = new MessageChannel();
  const frames = [];
  channel.port1.onmessage = ({ data }) => {
    frames[data].work = performance.now() - frames[data].start;
  };
  let source = "", next = 0, dirty = false;
  return await new Promise((resolve) => {
    const t0 = performance.now();
    const feed = setInterval(() => {
      // Catch up to where the clock says the stream is (timers may fire late).
      const due = Math.min(tokens.length, Math.floor((performance.now() - t0) * rate / 1000));
      while (next < due) source += tokens[next++];
      dirty = true;
      if (next >= tokens.length) clearInterval(feed);
    }, 1000 / rate);
    const frame = () => {
      if (dirty) {
        dirty = false;
        const start = performance.now();
        view.update(source);
        frames.push({ start, update: performance.now() - start, lexed: view.lastLexed, at: next });
        window.__updates = frames.length;
        window.__at = next;
        channel.port2.postMessage(frames.length - 1);
      }
      if (next < tokens.length || dirty) return requestAnimationFrame(frame);
      // The end: what the page does once the answer is complete (a one-shot DOM).
      requestAnimationFrame(() => {
        const start = performance.now();
        view.finish?.();
        const finish = performance.now() - start;
        setTimeout(() => {
          observer.disconnect();
          window.__done = true;
          resolve({ frames, finish, chars: source.length, shown: text.textContent.length,
                    longFrames: longFrames.map((e) => e.duration) });
        }, 100);
      });
    };
    requestAnimationFrame(frame);
  });
}"""


def feed(page, feed_args: list[object], n_tokens: int) -> dict:  # type: ignore[no-untyped-def]
    """Runs FEED in ``page``; meanwhile notes the renderer process's CPU time (all its
    threads: script, style, layout, paint, raster) and its main thread's, from Chromium's
    own counters, where the first quarter of the answer ends and where the last begins.
    CPU time per frame hardly depends on how many other jobs share the cores; the frame
    times above do."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    # Started, not awaited: the loop below samples the counters while it runs.
    page.evaluate(f"(args) => {{ window.__feed = ({FEED})(args); }}", feed_args)
    marks = [0, n_tokens // 4, n_tokens * 3 // 4]
    samples: list[tuple[int, dict[str, float]]] = []
    while True:
        updates, at, done = page.evaluate("[window.__updates, window.__at, window.__done]")
        if done or (len(samples) < 3 and at >= marks[len(samples)]):
            metrics = cdp.send("Performance.getMetrics")["metrics"]
            sample = (updates, {m["name"]: m["value"] for m in metrics})
            while len(samples) < 3 and (done or at >= marks[len(samples)]):
                samples.append(sample)
        if done:
            samples.append(sample)
            break
        time.sleep(0.05)
    result = page.evaluate("window.__feed")
    # (first quarter, last quarter): CPU ms per frame, process and main thread.
    cpu = {}
    for key in ("ProcessTime", "ThreadTime", "LayoutDuration", "RecalcStyleDuration"):
        per = []
        for (u0, m0), (u1, m1) in ((samples[0], samples[1]), (samples[2], samples[3])):
            per.append(1000 * (m1[key] - m0[key]) / max(1, u1 - u0))
        cpu[key] = per
    result["cpu"] = cpu
    return result


def answers(n_tokens: int) -> dict[str, list[str]]:
    def tokens(text: str) -> list[str]:
        return re.findall(r"\s*\S+|\s+", text)[:n_tokens]

    mixed = "".join(MIXED.format(n=i) for i in range(n_tokens // 40 + 1))
    code = "```python\n" + "".join(f"x_{i} = compute({i})\n" for i in range(n_tokens))
    paragraph = " ".join(f"word{i}" for i in range(n_tokens))
    table = "| row | value | note |\n| --- | ---: | --- |\n" + "".join(
        f"| {i} | {i * 7} | note {i} |\n" for i in range(n_tokens)
    )
    return {"mixed Markdown": tokens(mixed), "one code block": tokens(code),
            "one paragraph": tokens(paragraph), "one table": tokens(table)}  # fmt: skip


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ms3(values: list[float]) -> str:
    return f"{pct(values, 50):.1f} / {pct(values, 99):.1f} / {max(values, default=0):.1f}"


def row(name: str, renderer: str, result: dict, n_tokens: int) -> list[object]:
    frames = [f for f in result["frames"] if "work" in f]
    work = [f["work"] for f in frames]
    first = [f for f in frames if f["at"] <= n_tokens // 4]
    last = [f for f in frames if f["at"] > n_tokens * 3 // 4]
    long_frames = result["longFrames"]
    return [
        name, renderer, len(frames), ms3(work),
        sum(1 for w in work if w > LONG_FRAME_MS),
        f"{pct([f['work'] for f in first], 99):.1f} → {pct([f['work'] for f in last], 99):.1f}",
        "{:.1f} → {:.1f}".format(*result["cpu"]["ProcessTime"]),
        "{:.1f} → {:.1f}".format(*result["cpu"]["ThreadTime"]),
        "{:.1f} → {:.1f}".format(*result["cpu"]["RecalcStyleDuration"]),
        "{:.1f} → {:.1f}".format(*result["cpu"]["LayoutDuration"]),
        ms3([f["update"] for f in frames]),
        f"{max((f['lexed'] for f in first), default=0)} → "
        f"{max((f['lexed'] for f in last), default=0)}",
        f"{len(long_frames)} ({max(long_frames, default=0):.0f})",
        f"{result['finish']:.1f}", f"{os.getloadavg()[0]:.1f}",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="tokens per second")
    parser.add_argument("--only", help="run only the answers whose name contains this")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the old renderer")
    parser.add_argument("--no-baseline", action="store_true", help="the new renderer only")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent

    def baseline_module(route) -> None:  # type: ignore[no-untyped-def]
        # The baseline's own modules import each other from /static/: from its copies.
        name = route.request.url.rsplit("/", 1)[1]
        shown = subprocess.run(
            ["git", "show", f"{args.baseline}:{WEB}/{name}"], cwd=root, capture_output=True,
            text=True,
        )  # fmt: skip
        if shown.returncode != 0:
            route.fulfill(status=404)
            return
        body = re.sub(r'"/static/(?!vendor/)', '"/static/baseline/', shown.stdout)
        route.fulfill(body=body, content_type="text/javascript")

    renderers = {"new": "/static/markdown.js"}
    if not args.no_baseline:
        renderers[f"old ({args.baseline})"] = "/static/baseline/markdown.js"
    print(machine())
    port = free_port()
    cmd = tokenspout_serve(port, "--engine", "synthetic")
    with ServerProcess(cmd, port), sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"]
        )
        print(f"\n{args.tokens} tokens at {args.rate:g} tokens/s, headless Chromium\n")
        print(
            "| answer | renderer | frames | frame work ms p50 / p99 / max | frames > 16 ms | "
            "p99 first → last quarter | CPU ms per frame, first → last quarter: process | "
            "main thread | style | layout | renderer ms p50 / p99 / max | "
            "chars lexed max first → "
            "last quarter | long animation frames > 50 ms (max ms) | finish() ms | load |"
        )
        print("|---" * 15 + "|")
        for name, tokens in answers(args.tokens).items():
            if args.only and args.only not in name:
                continue
            for renderer, module in renderers.items():
                page = browser.new_page(bypass_csp=True)
                page.route("**/static/baseline/*.js", baseline_module)
                page.goto(f"http://127.0.0.1:{port}/")
                result = feed(page, [module, tokens, args.rate], args.tokens)
                page.close()
                assert result["shown"] > 0
                cells = row(name, renderer, result, args.tokens)
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        browser.close()


if __name__ == "__main__":
    main()
