"""What the benchmark scripts share: a server in a subprocess read through ``/proc``, and a
raw asyncio HTTP/1.1 client light enough to hold thousands of streams from one process.

Linux only (``/proc``). Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tokenspout_serve(port: int, *args: str, src: str | None = None) -> list[str]:
    """The command line of ``tokenspout serve`` on ``port`` (quiet: warnings only). With
    ``src``, the tokenspout of that checkout (another commit, for a before/after run)."""
    prefix = [sys.executable]
    module = "tokenspout.cli"
    if src is not None:
        prefix = ["env", f"PYTHONPATH={Path(src) / 'src'}", sys.executable]
        if not (Path(src) / "src/tokenspout/cli.py").exists():
            module = "tokenspout.client.cli"  # where `serve` lived before
    return [*prefix, "-m", module, "serve", "--port", str(port),
            "--log-level", "warning", *args]  # fmt: skip


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class ServerProcess:
    """A server command run as a subprocess until the ``with`` block ends; ``ready`` once
    ``GET /health`` answers 200. The child gets a high open-file limit before it starts."""

    def __init__(self, cmd: list[str], port: int, *, nofile: int = 20_000, ready_s: float = 120):
        self.cmd, self.port, self.nofile, self.ready_s = cmd, port, nofile, ready_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        nofile = self.nofile
        # `timeout` ends a benchmark with SIGTERM: exit through the `with` blocks so that the
        # server is stopped instead of left running.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: raise_nofile(nofile),
        )
        deadline = time.monotonic() + self.ready_s
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"server did not become ready: {' '.join(self.cmd)}")
                time.sleep(0.1)

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far (fields 14 and 15 of /proc/pid/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name may hold spaces; the fields after its closing parenthesis do not.
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/pid/status")


@dataclass
class RawResponse:
    """A response read to its end: status, the de-chunked body, bytes on the wire, and the
    client clock at each read that brought body bytes (``read_times``)."""

    status: int = 0
    body: bytes = b""
    wire_bytes: int = 0
    started: float = 0.0
    read_times: list[float] = field(default_factory=list)
    error: str | None = None


def request_bytes(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def dechunk(data: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body (RFC 9112 §7.1; extensions and trailers ignored)."""
    out = bytearray()
    i = 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[j + 2 : j + 2 + size]
        i = j + 2 + size + 2


async def fetch(
    port: int,
    path: str,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    keep_times: bool = False,
) -> RawResponse:
    """POST ``body`` (JSON) and read the response to the end of the connection."""
    res = RawResponse(started=time.perf_counter())
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    raw = bytearray()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes("POST", path, body, hdrs))
            while data := await reader.read(65536):
                raw += data
                if keep_times:
                    res.read_times.append(time.perf_counter())
    except (TimeoutError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    res.wire_bytes = len(raw)
    head, _, rest = bytes(raw).partition(b"\r\n\r\n")
    if head:
        res.status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        try:
            res.body = dechunk(rest) if chunked else rest
        except (ValueError, IndexError):
            res.error = res.error or "truncated chunked body"
            res.body = rest
    return res


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``p`` in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def machine() -> str:
    """A one-line description of this machine for RESULTS.md."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({model}), load average {load:.1f} at start"
