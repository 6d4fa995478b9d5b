"""tokenspout's embedded engine against llama.cpp's ``llama-server``, side by side in one run.

    .venv/bin/python benchmarks/engine_vs_llama_cpp.py --llama-server PATH \\
        [--concurrency 1,4,16] [--num-prompts 16] [--rounds 1] [--contention 0] \\
        [--distinct-prompts] [-- extra tokenspout serve arguments]

Both servers load the same GGUF (the default model, SmolLM2-135M-Instruct Q4_1) with 2
threads; ``llama-server`` gets one slot per stream of the largest level (at least 16). Each
level is ``tokenspout bench`` at the reference setup of ``shared/REFERENCE.md`` (chat prompt,
128 output tokens, ``ignore_eos``, temperature 0.8, over HTTP/SSE), on one server then the
other, the order alternating between rounds, so a change in the machine's load hits both.
tokenspout sends an event per token here (``--flush-tokens 1``), as llama-server does, so
ITL is the gap between tokens for both. ``--contention N`` runs N CPU-bound processes
(``while True: pass``) during every measurement; ``--distinct-prompts`` numbers each
request's prompt (``tokenspout bench --distinct-prompts``), so that no two share their
first token's computation (tokenspout's twins). Build llama-server with
``../shared/tools/build_llama_server.sh`` (GGML_NATIVE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import ServerProcess, free_port, machine, tokenspout_serve
from tokenspout.engine.model_files import ModelFiles

PROMPT = "Write a long story about a dragon and a knight."
FIGURES = ("median_ttft_ms", "median_tpot_ms", "p99_itl_ms", "max_itl_ms", "output_throughput")


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def bench(port: int, concurrency: int, num_prompts: int, out: Path, distinct: bool) -> dict:
    subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "bench",
         "--url", f"http://127.0.0.1:{port}", "--endpoint", "chat",
         "--concurrency", str(concurrency), "--num-prompts", str(num_prompts),
         "--max-tokens", "128", "--ignore-eos", "--temperature", "0.8",
         "--prompt", PROMPT, "--json", str(out),
         *(["--distinct-prompts"] if distinct else [])],
        check=True, timeout=1800, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, type=Path)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--contention", type=int, default=0, help="CPU-bound processes beside")
    parser.add_argument("--distinct-prompts", action="store_true", help="no two prompts alike")
    parser.add_argument("serve_args", nargs="*", help="extra `tokenspout serve` arguments")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    slots = max(16, *levels)
    gguf = ModelFiles.resolve(None).path
    print(f"machine: {machine()}; contention: {args.contention} busy processes; "
          f"{'distinct' if args.distinct_prompts else 'identical'} prompts")  # fmt: skip
    ours_port, theirs_port = free_port(), free_port()
    ours_cmd = tokenspout_serve(
        ours_port, "--flush-tokens", "1", "--max-num-seqs", str(slots), *args.serve_args
    )
    theirs_cmd = [str(args.llama_server), "-m", str(gguf), "-t", "2", "-np", str(slots),
                  "-c", str(1024 * slots), "--port", str(theirs_port)]  # fmt: skip
    results: dict[tuple[str, int], list[dict]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServerProcess(ours_cmd, ours_port, ready_s=600) as ours,
        ServerProcess(theirs_cmd, theirs_port, ready_s=600) as theirs,
    ):
        rss = {"tokenspout": ours.rss_bytes(), "llama.cpp": theirs.rss_bytes()}
        servers = [("tokenspout", ours_port), ("llama.cpp", theirs_port)]
        for r in range(args.rounds):
            for c in levels:
                for name, port in servers if r % 2 == 0 else servers[::-1]:
                    with busy_processes(args.contention):
                        data = bench(
                            port, c, args.num_prompts, Path(tmp) / "b.json", args.distinct_prompts
                        )
                    results.setdefault((name, c), []).append(data)
                    print(f"round {r + 1} c={c} {name}: {data['output_throughput']:.0f} tok/s",
                          file=sys.stderr, flush=True)  # fmt: skip
    mb = {name: f"{value / 2**20:.0f} MB" for name, value in rss.items()}
    print(f"\nRSS after start: tokenspout {mb['tokenspout']}, llama.cpp {mb['llama.cpp']}; "
          f"medians over {args.rounds} round(s)\n")  # fmt: skip
    print("| streams | server | TTFT p50 | TPOT p50 | ITL p99 | ITL max | output tok/s |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        row: dict[str, dict[str, float]] = {}
        for name in ("tokenspout", "llama.cpp"):
            runs = results[(name, c)]
            row[name] = {f: statistics.median(run[f] for run in runs) for f in FIGURES}
            v = row[name]
            print(f"| {c} | {name} | {v['median_ttft_ms']:.0f} ms | {v['median_tpot_ms']:.1f} ms"
                  f" | {v['p99_itl_ms']:.0f} ms | {v['max_itl_ms']:.0f} ms"
                  f" | {v['output_throughput']:.0f} |")  # fmt: skip
        ours_v, theirs_v = row["tokenspout"], row["llama.cpp"]
        ttft = ours_v["median_ttft_ms"] / theirs_v["median_ttft_ms"]
        rate = ours_v["output_throughput"] / theirs_v["output_throughput"]
        print(f"| {c} | **ratio** | {ttft:.2f}x | | | | **{rate:.2f}x** |")


if __name__ == "__main__":
    main()
