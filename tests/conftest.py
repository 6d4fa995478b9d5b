"""Shared fixtures: a real tokenspout server on 127.0.0.1, in a thread of the test process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from tokenspout.engine.interface import Engine
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.protocols import json_limits
from tokenspout.server.app import create_app
from tokenspout.server.config import ServerConfig
from tokenspout.server.connection_limits import uvicorn_options
from tokenspout.server.server_state import ServerState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    port: int
    state: ServerState
    engine: Engine

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. metric("tokenspout_requests_aborted_total",
        'reason="client_disconnect"')."""
        text = httpx.get(f"{self.url}/metrics").text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise KeyError(key)

    def wait_metric(self, name: str, value: float, timeout: float = 5.0, labels: str = "") -> float:
        """Poll until the metric equals ``value``; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.metric(name, labels) == value:
                return time.monotonic() - start
            time.sleep(0.005)
        raise AssertionError(f"{name} did not reach {value}: {self.metric(name, labels)}")


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


def _start(
    engine: Engine, config: ServerConfig, port: int | None = None
) -> tuple[RunningServer, Callable[[], None]]:
    """A server on ``port`` (a free one by default); returns it and its stop function."""
    port = port or free_port()
    app = create_app(engine, config)
    options = uvicorn_options(app.state.tokenspout)
    server = _ThreadServer(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    scheme = "https" if config.ssl_certfile else "http"
    running = RunningServer(f"{scheme}://127.0.0.1:{port}", port, app.state.tokenspout, engine)
    return running, stop


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``start_server(engine=..., **ServerConfig fields)`` → a running server."""
    stops: list[Callable[[], None]] = []

    def factory(engine: Engine | None = None, **config: object) -> RunningServer:
        running, stop = _start(engine or SyntheticEngine(), ServerConfig(**config))  # type: ignore[arg-type]
        stops.append(stop)
        return running

    yield factory
    for stop in stops:
        stop()


@pytest.fixture
def synthetic_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """A synthetic engine at 2 ms per token."""
    return start_server(SyntheticEngine(itl_ms=2))


@pytest.fixture
def unencodable_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injector for output that cannot be encoded: requests with a lone surrogate,
    refused at parse time, are let through, so that the synthetic engine echoes one."""
    monkeypatch.setattr(json_limits, "check_value", lambda data, max_depth=0: None)
