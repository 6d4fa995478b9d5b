"""Server CPU per delivered token with request tracing off and on.

``tokenspout serve --engine synthetic --synthetic-itl-ms 10`` under the transport-cost load
(``--streams`` concurrent streams of ``--tokens`` tokens, default coalescing), started
without ``--otlp-traces-endpoint`` ("off") and with it ("on", exporting to an OTLP/HTTP
receiver in this process that counts the traces it gets), alternating, ``--reps`` times.

    .venv/bin/python benchmarks/tracing_cost.py --streams 400 --tokens 300 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from harness import ServerProcess, free_port, machine, raise_nofile
from transport_cost import TOKEN, load


class Receiver:
    """Counts the root spans (one per request) POSTed to it."""

    def __init__(self) -> None:
        self.roots = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                spans = [
                    span
                    for resource in ExportTraceServiceRequest.FromString(body).resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                ]
                with lock:
                    receiver.roots += sum(1 for s in spans if not s.parent_span_id)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def measure(
    traced: Receiver | None, args: argparse.Namespace, src: str | None = None
) -> tuple[float, int]:
    """µs of server CPU per token received, and the traces exported (``src``: run the
    package from this folder instead)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tokenspout.client.cli", "serve", "--engine", "synthetic",
           "--synthetic-itl-ms", str(args.itl_ms), "--port", str(port)]  # fmt: skip
    if traced is not None:
        cmd += ["--otlp-traces-endpoint", traced.url]
    before = traced.roots if traced else 0
    if src is not None:
        os.environ["PYTHONPATH"] = src
    with ServerProcess(cmd, port) as server:
        time.sleep(0.5)  # start-up work settles before the CPU clock is read
        cpu0 = server.cpu_seconds()
        responses = asyncio.run(load(port, args.streams, args.tokens, args.limit_s))
        cpu = server.cpu_seconds() - cpu0
    os.environ.pop("PYTHONPATH", None)
    # Leaving the block stopped the server, whose shutdown flushes the last batch.
    tokens = sum(r.body.count(TOKEN) for r in responses)
    return cpu / max(tokens, 1) * 1e6, (traced.roots - before) if traced else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--limit-s", type=float, default=120.0)
    parser.add_argument("--before-src", help="src/ folder of the code before tracing")
    args = parser.parse_args()
    raise_nofile(args.streams + 1024)
    print(machine())
    receiver = Receiver()
    results: dict[str, list[float]] = {"off": [], "on": []}
    if args.before_src:
        results["before"] = []
    exported: list[int] = []
    for _ in range(args.reps):
        if args.before_src:
            results["before"].append(measure(None, args, args.before_src)[0])
        results["off"].append(measure(None, args)[0])
        us, traces = measure(receiver, args)
        results["on"].append(us)
        exported.append(traces)
    print(f"\n{args.streams} streams x {args.tokens} tokens at {args.itl_ms:g} ms/token")
    print("| tracing | µs CPU / token (median) | per rep | traces received per run |")
    print("|---|---|---|---|")
    for name, reps in results.items():
        traces = exported if name == "on" else ["-"] * len(reps)
        median = statistics.median(reps)
        print(f"| {name} | {median:.2f} | {[round(r, 2) for r in reps]} | {traces} |")


if __name__ == "__main__":
    main()
