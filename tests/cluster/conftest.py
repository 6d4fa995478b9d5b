"""Real parts for the replica tests: redis-server and nginx (Debian's, installed by `make
dev`) on free ports in a temporary directory, and `tokenspout serve` processes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


REDIS_SERVER = _binary("redis-server")
NGINX = _binary("nginx")

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Until something accepts on ``port`` (polled: a process start has no other signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port}")


@dataclass
class RedisServer:
    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        # No persistence: a restart comes back empty, the hardest case for the replicas.
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str) -> str:
        """One redis-cli command's answer (reading Redis as an operator would)."""
        cli = _binary("redis-cli")
        assert cli is not None
        out = subprocess.run(
            [cli, "-p", str(self.port), *args], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make dev installs it)")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@dataclass
class Replica:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{self.url}/health").json()

    def metric(self, name: str, labels: str = "") -> float:
        key = f"{name}{{{labels}}}" if labels else name
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise KeyError(key)

    def wait_metric(self, name: str, value: float, timeout: float = 30, labels: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(KeyError):  # a labelled sample appears at its first count
                if self.metric(name, labels) == value:
                    return
            time.sleep(0.02)
        raise AssertionError(f"{name}{{{labels}}} did not reach {value} on {self.url}")


@dataclass
class ReplicaSet:
    redis: RedisServer
    directory: Path
    replicas: list[Replica] = field(default_factory=list)

    def start(self, *args: str, engine: str = "synthetic") -> Replica:
        return self.start_many(1, *args, engine=engine)[0]

    def start_many(self, count: int, *args: str, engine: str = "synthetic") -> list[Replica]:
        """``count`` replicas started together (a process start takes seconds here)."""
        started = [self._spawn(args, engine) for _ in range(count)]
        for replica in started:
            self._wait_ready(replica)
        return started

    def _spawn(self, args: tuple[str, ...], engine: str) -> Replica:
        port = free_port()
        log = self.directory / f"replica-{port}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", engine,
             "--port", str(port), "--redis-url", self.redis.url, "--log-level", "warning",
             "--drain-timeout-s", "1", *args],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        replica = Replica(f"http://127.0.0.1:{port}", port, proc, log)
        self.replicas.append(replica)
        return replica

    @staticmethod
    def _wait_ready(replica: Replica) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if replica.proc.poll() is not None:
                raise RuntimeError(f"replica exited: {replica.log.read_text()}")
            try:
                if httpx.get(f"{replica.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("replica did not start")

    def owner(self, stream_id: str) -> Replica:
        """The replica generating ``stream_id``, as Redis records it."""
        replica_id = self.redis.cli("HGET", f"tokenspout:m:{stream_id}", "replica")
        for replica in self.replicas:
            if replica.proc.poll() is None and replica.health().get("replica") == replica_id:
                return replica
        raise LookupError(f"no live replica owns {stream_id}")

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            try:
                replica.proc.wait(20)
            except subprocess.TimeoutExpired:
                replica.proc.kill()


@pytest.fixture
def replica_set(redis_server: RedisServer, tmp_path: Path) -> Iterator[ReplicaSet]:
    replicas = ReplicaSet(redis_server, tmp_path)
    yield replicas
    replicas.stop()


class RedisCutter:
    """A fault injector between a replica and Redis (point the replica's ``--redis-url`` at
    ``url``): ``cut()`` drops every connection and closes new ones at once, as a network
    partition would, until ``restore()``."""

    def __init__(self, redis: RedisServer):
        self._redis_port = redis.port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._redis_port))
            with self._lock:
                self._open.update((conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            _shut(*self._open)
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        _shut(self._listener)
        self._listener.close()
        self.cut()


def _shut(*socks: socket.socket) -> None:
    # shutdown, not close alone: another thread's recv() on the socket must return.
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def redis_cutter(redis_server: RedisServer) -> Iterator[RedisCutter]:
    cutter = RedisCutter(redis_server)
    yield cutter
    cutter.close()


def nginx_conf(listen: int, upstreams: list[int]) -> str:
    """The shipped deploy/nginx.conf, listening on ``listen`` and in front of
    ``upstreams``: only the ports change."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    text, listens = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", text)
    assert listens == 1, "deploy/nginx.conf listens on 127.0.0.1:PORT"
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+ (.*);$", text, flags=re.M)
    assert servers, "deploy/nginx.conf lists its replicas as server 127.0.0.1:PORT ..."
    lines = "\n".join(f"        server 127.0.0.1:{p} {servers[0]};" for p in upstreams)
    text = re.sub(r"(?:^\s*server 127\.0\.0\.1:\d+ .*;\n)+", lines + "\n", text, flags=re.M)
    return text


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[list[int]], str]]:
    """``start_nginx(ports)`` → the URL of nginx in front of those replica ports."""
    if NGINX is None:
        pytest.skip("nginx is not installed (make dev installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstreams: list[int]) -> str:
        port = free_port()
        prefix = tmp_path / f"nginx-{port}"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(port, upstreams))
        log = (prefix / "stderr.log").open("wb")
        proc = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        wait_port(port, proc, "nginx")
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def kill(replica: Replica) -> None:
    """SIGKILL: no drain, no last write to Redis."""
    os.kill(replica.proc.pid, signal.SIGKILL)
    replica.proc.wait(10)
