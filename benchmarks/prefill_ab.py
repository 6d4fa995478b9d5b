"""A prompt's prefill with this checkout against another commit's, whole code paths, alternating.

    .venv/bin/python benchmarks/prefill_ab.py [--base HEAD] [--tokens 1000] [--chunk 256] \\
        [--rounds 12] [--threads 2]

Each side runs in a worker process of its own (the base from ``git archive`` of its ``src``),
with the default model in this CPU's default format: a ``--tokens`` prompt into an empty
slot, ``--chunk`` tokens per ``ModelRunner.forward`` step as the scheduler's
``max_prefill_tokens`` cuts it. The two take turns, prefill by prefill (which goes first
alternates too), so that the host's noise, which moves separate runs by ±15 % here, falls on
both alike. Unlike ``decode_step_ab.py`` (the C kernels only, in one process), this times
Python and C changes together. Reports each side's median and best time, their ratio, and
whether the two agree on the prompt's next token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One prefill per line of stdin; one JSON line back: seconds and the next token.
WORKER = """
import json, sys, time
from tokenspout.engine.model_runner import ModelRunner, SeqChunk
tokens, chunk, threads = (int(a) for a in sys.argv[1:4])
runner = ModelRunner(None, num_slots=1, max_model_len=tokens + 8, num_threads=threads)
prompt = [1000 + (7 * i) % 20000 for i in range(tokens)]
for _ in sys.stdin:
    start = time.perf_counter()
    for s in range(0, tokens, chunk):
        logits = runner.forward([SeqChunk(0, prompt[s : s + chunk], s)])
    elapsed = time.perf_counter() - start
    print(json.dumps([elapsed, int(logits[0].argmax())]), flush=True)
"""


def base_source(rev: str, out: Path) -> Path:
    """``rev``'s ``src`` folder, unpacked under ``out``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out / "src"


def start_worker(src: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-c", WORKER, str(args.tokens), str(args.chunk), str(args.threads)]
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def prefill(worker: subprocess.Popen[str]) -> tuple[float, int]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write("run\n")
    worker.stdin.flush()
    elapsed, token = json.loads(worker.stdout.readline())
    return elapsed, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--tokens", type=int, default=1000, help="prompt length")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per step")
    parser.add_argument("--rounds", type=int, default=12, help="prefills each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workers = {
            args.base: start_worker(base_source(args.base, Path(tmp)), args),
            "this": start_worker(ROOT / "src", args),
        }
        try:
            for worker in workers.values():
                prefill(worker)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in workers}
            tokens: dict[str, set[int]] = {name: set() for name in workers}
            for n in range(args.rounds):
                order = list(workers.items())
                for name, worker in order if n % 2 else order[::-1]:
                    elapsed, token = prefill(worker)
                    times[name].append(elapsed)
                    tokens[name].add(token)
        finally:
            for worker in workers.values():
                worker.kill()
    (a, ta), (b, tb) = times.items()
    med = [statistics.median(ta), statistics.median(tb)]
    print(
        f"{args.tokens}-token prompt in {args.chunk}-token steps, {args.threads} threads, "
        f"{args.rounds} prefills each, alternating\n"
    )
    print(f"| {a} median | this median | ratio | {a} best | this best | next token |")
    print("|---|---|---|---|---|---|")
    agree = "same" if tokens[a] == tokens[b] and len(tokens[a]) == 1 else f"{tokens}"
    print(
        f"| {med[0] * 1e3:.0f} ms | {med[1] * 1e3:.0f} ms | {med[1] / med[0]:.3f} | "
        f"{min(ta) * 1e3:.0f} ms | {min(tb) * 1e3:.0f} ms | {agree} |"
    )


if __name__ == "__main__":
    main()
