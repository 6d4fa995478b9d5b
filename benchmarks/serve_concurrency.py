"""``tokenspout bench`` against ``tokenspout serve`` (the default real engine) at the
reference setup, next to the llama.cpp numbers of ``../shared/REFERENCE.md``.

Chat prompt "Write a long story about a dragon and a knight.", 128 output tokens,
``ignore_eos``, temperature 0.8, concurrency 1, 4 and 16, ``--num-prompts`` requests per
level sent all at once (at most ``concurrency`` in flight). Unlike the in-process
``engine_concurrency.py`` this goes through HTTP/SSE and the client's clock. Arguments after
``--`` go to ``tokenspout serve`` (e.g. ``-- --no-prefix-cache``).

    .venv/bin/python benchmarks/serve_concurrency.py --num-prompts 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ServerProcess, free_port, machine, tokenspout_serve

#: REFERENCE.md, llama.cpp server: TTFT p50 ms, mean ITL ms, e2e p50 s, aggregate tok/s.
LLAMA_CPP = {1: (91, 12.3, 1.65, 78), 4: (338, 33, 4.54, 113), 16: (1212, 114, 15.64, 131)}
PROMPT = "Write a long story about a dragon and a knight."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("serve_args", nargs="*", help="extra `tokenspout serve` arguments")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    port = free_port()
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServerProcess(tokenspout_serve(port, *args.serve_args), port, ready_s=600),
    ):
        out = Path(tmp) / "bench.json"
        subprocess.run(
            [sys.executable, "-m", "tokenspout.cli", "bench",
             "--url", f"http://127.0.0.1:{port}", "--endpoint", "chat",
             "--concurrency", args.concurrency, "--num-prompts", str(args.num_prompts),
             "--max-tokens", "128", "--ignore-eos", "--temperature", "0.8",
             "--prompt", PROMPT, "--json", str(out)],
            check=True,
            timeout=1800,
        )  # fmt: skip
        data = json.loads(out.read_text())
    levels = data if isinstance(data, list) else [data]
    print(
        "\n| concurrency | TTFT p50 | mean ITL | e2e p50 | aggregate output tok/s | completed "
        "| llama.cpp (TTFT / ITL / e2e / tok/s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        c = level["concurrency"]
        ref = LLAMA_CPP.get(c)
        ref_text = f"{ref[0]} ms / {ref[1]} ms / {ref[2]} s / {ref[3]}" if ref else "-"
        print(
            f"| {c} | {level['median_ttft_ms']:.0f} ms | {level['mean_itl_ms']:.1f} ms"
            f" | {level['median_e2el_ms'] / 1000:.2f} s | {level['output_throughput']:.0f}"
            f" | {level['completed']}/{level['num_prompts']} | {ref_text} |"
        )


if __name__ == "__main__":
    main()
