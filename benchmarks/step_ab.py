"""Engine steps with this checkout against another commit's, whole code paths, alternating.

    .venv/bin/python benchmarks/step_ab.py [--base HEAD] [--tokens 1000] [--chunk 256] \\
        [--decode 0] [--steps 50] [--rounds 12] [--threads 2] [--weights FORMAT] \\
        [--base-kernels avx2]

Each side runs in a worker process of its own (the base from ``git archive`` of its ``src``),
with the default model in this CPU's default format (or ``--weights``). ``--base-kernels`` sets
``TOKENSPOUT_KERNELS`` for the base, e.g. ``--base HEAD --base-kernels avx2`` against this
checkout's best build: the two builds of the same code side by side. A round is a ``--tokens``
prompt's prefill into an empty slot, ``--chunk`` tokens per ``ModelRunner.forward`` step as the
scheduler's ``max_prefill_tokens`` cuts it; or, with ``--decode B``, ``--steps`` decode steps
of B sequences whose ``--tokens`` prompts were prefilled at the start (timed per step). The two
take turns, round by round (which goes first alternates too), so that the host's noise, which
moves separate runs by ±15 % here, falls on both alike. Unlike ``decode_step_ab.py`` (the C
kernels only, in one process, on one set of weights), this times Python, C and weight layout
changes together. Reports each side's median and best time, their ratio, and whether the two
agree on the next tokens.
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

# One round per line of stdin; one JSON line back: seconds (a prefill's, or a decode step's
# median) and the next tokens.
WORKER = """
import json, statistics, sys, time
from tokenspout.engine.model_runner import ModelRunner, SeqChunk
tokens, chunk, batch, steps, threads = (int(a) for a in sys.argv[1:6])
weights = sys.argv[6] or None
slots = max(batch, 1)
runner = ModelRunner(
    None, num_slots=slots, max_model_len=tokens + steps + 8, weights=weights, num_threads=threads
)
prompt = [1000 + (7 * i) % 20000 for i in range(tokens)]

def prefill(slot):
    for s in range(0, tokens, chunk):
        logits = runner.forward([SeqChunk(slot, prompt[s : s + chunk], s)])
    return logits

if batch:
    for slot in range(batch):
        first = int(prefill(slot)[0].argmax())
for _ in sys.stdin:
    if not batch:
        start = time.perf_counter()
        logits = prefill(0)
        print(json.dumps([time.perf_counter() - start, [int(logits[0].argmax())]]), flush=True)
        continue
    ids, times = [first] * batch, []
    for n in range(steps):  # the same positions every round: the cache is overwritten
        start = time.perf_counter()
        logits = runner.forward([SeqChunk(s, [ids[s]], tokens + n) for s in range(batch)])
        times.append(time.perf_counter() - start)
        ids = logits.argmax(-1).tolist()
    print(json.dumps([statistics.median(times), ids]), flush=True)
"""


def base_source(rev: str, out: Path) -> Path:
    """``rev``'s ``src`` folder, unpacked under ``out``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out / "src"


def start_worker(src: Path, args: argparse.Namespace, kernels: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    if kernels:
        env["TOKENSPOUT_KERNELS"] = kernels
    numbers = (args.tokens, args.chunk, args.decode, args.steps, args.threads)
    argv = [sys.executable, "-c", WORKER, *map(str, numbers), args.weights]
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def run_round(worker: subprocess.Popen[str]) -> tuple[float, tuple[int, ...]]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write("run\n")
    worker.stdin.flush()
    elapsed, tokens = json.loads(worker.stdout.readline())
    return elapsed, tuple(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--tokens", type=int, default=1000, help="prompt length")
    parser.add_argument("--chunk", type=int, default=256, help="prompt tokens per step")
    parser.add_argument("--decode", type=int, default=0, help="time decode steps of B sequences")
    parser.add_argument("--steps", type=int, default=50, help="decode steps a round")
    parser.add_argument("--rounds", type=int, default=12, help="rounds each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default="", help="weight format (default: the CPU's)")
    parser.add_argument("--base-kernels", default="", help="TOKENSPOUT_KERNELS for the base")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workers = {
            args.base: start_worker(base_source(args.base, Path(tmp)), args, args.base_kernels),
            "this": start_worker(ROOT / "src", args),
        }
        try:
            for worker in workers.values():
                run_round(worker)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in workers}
            tokens: dict[str, set[tuple[int, ...]]] = {name: set() for name in workers}
            for n in range(args.rounds):
                order = list(workers.items())
                for name, worker in order if n % 2 else order[::-1]:
                    elapsed, next_tokens = run_round(worker)
                    times[name].append(elapsed)
                    tokens[name].add(next_tokens)
        finally:
            for worker in workers.values():
                worker.kill()
    (a, ta), (b, tb) = times.items()
    med = [statistics.median(ta), statistics.median(tb)]
    what = (
        f"decode steps of {args.decode} sequences after {args.tokens}-token prompts, median of "
        f"{args.steps} a round"
        if args.decode
        else f"{args.tokens}-token prompt in {args.chunk}-token steps"
    )
    print(f"{what}, {args.threads} threads, {args.rounds} rounds each, alternating\n")
    print(f"| {a} median | this median | ratio | {a} best | this best | next tokens |")
    print("|---|---|---|---|---|---|")
    agree = "same" if tokens[a] == tokens[b] and len(tokens[a]) == 1 else "differ"
    print(
        f"| {med[0] * 1e3:.1f} ms | {med[1] * 1e3:.1f} ms | {med[1] / med[0]:.3f} | "
        f"{min(ta) * 1e3:.1f} ms | {min(tb) * 1e3:.1f} ms | {agree} |"
    )


if __name__ == "__main__":
    main()
