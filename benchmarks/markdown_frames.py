"""Frame cost of the page's Markdown renderer while a long answer streams, in headless
Chromium (Debian's /usr/bin/chromium, as the browser tests use).

The page's own ``MarkdownView`` (``/static/markdown.js``, inside the page's answer markup
and styles) is fed ``--tokens`` word-sized tokens at ``--rate`` tokens/s by a timer in the
page, and renders at most once per animation frame, as the chat page does. Per frame it
records the renderer's time (lex + render + sanitise + the DOM swap), what it lexed, and
the gap since the previous frame (a gap over 20 ms, 16.7 × 1.2, is a missed 60 Hz frame; a
"long animation frame" is over 50 ms). Three answers: mixed Markdown (headings, lists,
tables, code blocks: the usual case), one 5,000-token code block, and one 5,000-token
paragraph (the last block is the whole answer: the worst case for "re-render the last
block").

    .venv/bin/python benchmarks/markdown_frames.py --tokens 5000 --rate 100
"""

from __future__ import annotations

import argparse
import re
import statistics

from playwright.sync_api import sync_playwright

from harness import ServerProcess, free_port, machine, tokenspout_serve

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

FEED = """async ([tokens, rate]) => {
  const { MarkdownView } = await import("/static/markdown.js");
  const section = document.createElement("section");
  section.className = "answer";
  const text = document.createElement("div");
  text.className = "text";
  section.append(text);
  document.getElementById("log").append(section);
  const view = new MarkdownView(text);
  let source = "", next = 0, dirty = false, last = performance.now();
  const frames = [];
  return await new Promise((resolve) => {
    const feed = setInterval(() => {
      // Catch up to where the clock says the stream is (timers may fire late).
      const due = Math.min(tokens.length, Math.floor((performance.now() - t0) * rate / 1000));
      while (next < due) source += tokens[next++];
      dirty = true;
      if (next >= tokens.length) clearInterval(feed);
    }, 1000 / rate);
    const t0 = performance.now();
    const frame = (now) => {
      let update = null, lexed = null;
      if (dirty) {
        dirty = false;
        const start = performance.now();
        view.update(source);
        update = performance.now() - start;
        lexed = view.lastLexed;
      }
      frames.push([now - last, update, lexed, next]);
      last = now;
      if (next < tokens.length || dirty) requestAnimationFrame(frame);
      else resolve({ frames, chars: source.length, shown: text.textContent.length });
    };
    requestAnimationFrame(frame);
  });
}"""


def answers(n_tokens: int) -> dict[str, list[str]]:
    def tokens(text: str) -> list[str]:
        return re.findall(r"\s*\S+|\s+", text)[:n_tokens]

    mixed = "".join(MIXED.format(n=i) for i in range(n_tokens // 40 + 1))
    code = "```python\n" + "".join(f"x_{i} = compute({i})\n" for i in range(n_tokens))
    paragraph = " ".join(f"word{i}" for i in range(n_tokens))
    return {"mixed Markdown": tokens(mixed), "one code block": tokens(code),
            "one paragraph": tokens(paragraph)}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="tokens per second")
    parser.add_argument("--only", help="run only the answer whose name contains this")
    args = parser.parse_args()
    print(machine())
    port = free_port()
    cmd = tokenspout_serve(port, "--engine", "synthetic")
    with ServerProcess(cmd, port), sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"]
        )
        print(f"\n{args.tokens} tokens at {args.rate:g} tokens/s, headless Chromium\n")
        print("| answer | quarter of the answer | frames | renderer ms p50 / p99 / max | "
              "chars lexed p50 / max | frame gap > 20 ms | frames > 50 ms |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name, tokens in answers(args.tokens).items():
            if args.only and args.only not in name:
                continue
            page = browser.new_page(bypass_csp=True)
            page.goto(f"http://127.0.0.1:{port}/")
            result = page.evaluate(FEED, [tokens, args.rate])
            page.close()
            assert result["shown"] > 0
            frames = result["frames"][1:]
            for quarter in range(4):
                lo, hi = args.tokens * quarter // 4, args.tokens * (quarter + 1) // 4
                part = [f for f in frames if lo < f[3] <= hi]
                updates = [f[1] for f in part if f[1] is not None]
                lexed = [f[2] for f in part if f[2] is not None]
                gaps = sum(1 for f in part if f[0] > 16.7 * 1.2)
                long = sum(1 for f in part if f[0] > 50)
                cells = [
                    name, f"tokens {lo + 1}-{hi}", len(part),
                    f"{pct(updates, 50):.2f} / {pct(updates, 99):.2f} / {max(updates):.2f}",
                    f"{int(statistics.median(lexed))} / {max(lexed)}", gaps, long,
                ]  # fmt: skip
                print("| " + " | ".join(str(c) for c in cells) + " |")
        browser.close()


if __name__ == "__main__":
    main()
