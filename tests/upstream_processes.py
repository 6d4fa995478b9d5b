"""Upstream servers for the upstream engine's tests, each a real process on 127.0.0.1: a
``tokenspout serve`` (synthetic or embedded engine) or the fault-injecting upstream
(``tests/upstream_faults.py``), and a tokenspout in front of them in the test process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import RunningServer, free_port
from tokenspout.engine.upstream_engine import UpstreamEngine
from tokenspout.engine.upstream_options import UpstreamOptions

ROOT = Path(__file__).parent.parent


@dataclass
class UpstreamProcess:
    """A server process: ``url`` is its root, ``base`` its OpenAI base (``.../v1``)."""

    proc: subprocess.Popen[bytes]
    url: str

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    def fault(self, fault: str, **settings: object) -> None:
        """Set how the fault-injecting upstream fails from now on."""
        httpx.post(f"{self.url}/fault", json={"fault": fault, **settings}).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats").json()

    def wait_abandoned(self, user: str, timeout: float = 20.0) -> None:
        """Until the fault-injecting upstream saw the client of ``user``'s answer go away
        (its response closed)."""
        deadline = time.monotonic() + timeout
        while user not in self.stats()["abandoned"]:
            assert time.monotonic() < deadline, "the upstream's response was never closed"
            time.sleep(0.005)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn(args: list[str], *, ready: str = "/v1/models", timeout: float = 120.0) -> UpstreamProcess:
    """Start ``args`` + ``--port N`` and wait until ``ready`` answers 200."""
    port = free_port()
    # A file, not a pipe: nobody reads a pipe once the server is up, and a process whose
    # logs (the fault injector's tracebacks) filled its 64 KB blocked in the write, for good.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [*args, "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{args} exited: {log.read().decode()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + ready).status_code == 200:
                return UpstreamProcess(proc, url)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def tokenspout(*flags: str) -> UpstreamProcess:
    """``tokenspout serve`` with one event per token (unless ``flags`` set the flush)."""
    return spawn(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--log-level", "warning",
         "--flush-tokens", "1", "--flush-ms", "0", *flags],
        timeout=600,  # the embedded engine loads its model first
    )  # fmt: skip


def faulty(*flags: str) -> UpstreamProcess:
    return spawn([sys.executable, "-m", "tests.upstream_faults", *flags])


@contextlib.contextmanager
def processes(*starts: Callable[[], UpstreamProcess]) -> Iterator[list[UpstreamProcess]]:
    started: list[UpstreamProcess] = []
    try:
        for start in starts:
            started.append(start())
        yield started
    finally:
        for p in started:
            p.stop()


def front(
    start_server: Callable[..., RunningServer],
    *upstreams: UpstreamProcess | str,
    config: dict | None = None,
    **options: object,
) -> RunningServer:
    """A tokenspout (in this process) in front of ``upstreams`` (processes or base URLs)."""
    urls = tuple(u if isinstance(u, str) else u.base for u in upstreams)
    engine = UpstreamEngine(UpstreamOptions(urls, **options))  # type: ignore[arg-type]
    return start_server(engine, **(config or {}))
