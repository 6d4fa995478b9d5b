"""How much CPU each server thread gets while one stream runs, quiet or beside busy processes.

    .venv/bin/python benchmarks/thread_share.py [--threads N] [--busy 2] [--num-prompts 8]

Starts ``tokenspout serve`` (the embedded engine; ``--threads`` fixes its model threads,
default: the CPU budget's own choice), warms it with two requests, starts ``--busy``
processes that spin (``python3 -c 'while True: pass'``), runs ``tokenspout bench
--concurrency 1`` (128 tokens, ``ignore_eos``, temperature 0.8) and prints the output rate
and, per server thread that ran, its CPU time and its run-queue wait over the bench
(``/proc/PID/task/TID/schedstat``). CPU time per token says whether a thread count is
bound by the CPU it gets or by waiting for the other thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKENSPOUT = str(ROOT / ".venv" / "bin" / "tokenspout")
MAX_TOKENS = 128


def thread_times(pid: int) -> dict[str, tuple[str, int, int]]:
    """Thread id -> (name, CPU ns, run-queue wait ns)."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            cpu, wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        times[tid] = (name, int(cpu), int(wait))
    return times


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    while True:
        if proc.poll() is not None:
            sys.exit("the server exited")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a starting process: there is no signal to wait on


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="fixed model threads (0: auto)")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside it")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    # Stopped from outside (``timeout``), the spinning processes and the server go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))
    url = f"http://127.0.0.1:{args.port}"
    serve = [TOKENSPOUT, "serve", "--port", str(args.port)]
    if args.threads:
        serve += ["--threads", str(args.threads)]
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    busy: list[subprocess.Popen[bytes]] = []
    try:
        wait_ready(url, server)
        bench = [TOKENSPOUT, "bench", "--url", url, "--concurrency", "1", "--max-tokens",
                 str(MAX_TOKENS), "--ignore-eos", "--temperature", "0.8"]  # fmt: skip
        subprocess.run([*bench, "--num-prompts", "2"], capture_output=True, check=True)
        busy = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
        ]
        before, start = thread_times(server.pid), time.monotonic()
        out = subprocess.run(
            [*bench, "--num-prompts", str(args.num_prompts)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        wall, after = time.monotonic() - start, thread_times(server.pid)
    finally:
        for proc in busy:
            proc.kill()
        server.send_signal(signal.SIGINT)
        server.wait()
    line = next(line for line in out.stdout.splitlines() if "output throughput" in line)
    rate = float(line.split("│")[-2])
    tokens = args.num_prompts * MAX_TOKENS
    threads = args.threads or "auto"
    print(f"threads {threads}, {args.busy} busy process(es): {rate:.1f} tok/s, {wall:.1f} s")
    print("| thread | CPU s | share of the wall time | CPU ms a token | run-queue wait s |")
    print("|---|---|---|---|---|")
    for tid, (name, cpu, wait) in after.items():
        if tid not in before:
            continue
        cpu_s = (cpu - before[tid][1]) / 1e9
        if cpu_s < 0.05:
            continue
        wait_s = (wait - before[tid][2]) / 1e9
        print(f"| {name} {tid} | {cpu_s:.2f} | {cpu_s / wall:.0%} | "
              f"{cpu_s * 1000 / tokens:.1f} | {wait_s:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
