"""What the routes share: engine, config, streams, metrics and the draining flag."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from tokenspout.engine.interface import Engine
from tokenspout.server.api_keys import KeyStore
from tokenspout.server.config import ServerConfig
from tokenspout.server.key_admission import stream_ended
from tokenspout.server.key_limits import InMemoryKeyLimiter, KeyLimiter
from tokenspout.server.key_metrics import KeyMetrics
from tokenspout.server.metrics import Metrics
from tokenspout.server.send_watchdog import SendWatchdog
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_registry import ResumePolicy, StreamRegistry
from tokenspout.streaming.stream_store import InMemoryStreamStore

if TYPE_CHECKING:
    from tokenspout.cluster.replica import Replica


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    metrics: Metrics = field(init=False)
    streams: StreamRegistry = field(init=False)
    send_watchdog: SendWatchdog = field(init=False)
    keys: KeyStore = field(init=False)
    key_limiter: KeyLimiter = field(init=False)
    key_metrics: KeyMetrics = field(init=False)
    #: Tokens each open stream of a key was charged ahead (its ``max_tokens``), by stream
    #: id: given back, less what it generated, when it ends (``key_admission``).
    key_reserved: dict[str, int] = field(init=False, default_factory=dict)
    ready: bool = False
    draining: bool = False
    engine_started: bool = False
    #: Unix time the server started: the ``created`` of the models it lists.
    created: int = field(init=False, default_factory=lambda: int(time.time()))
    #: This process as one of several replicas sharing streams (``--redis-url``).
    cluster: Replica | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine)
        cfg = self.config
        self.keys = KeyStore(cfg.api_key, cfg.api_keys_file)
        self.key_limiter = InMemoryKeyLimiter()
        self.key_metrics = KeyMetrics(self.metrics.registry)
        self.send_watchdog = SendWatchdog(cfg.send_timeout_s)
        bounds = {
            "max_stream_bytes": cfg.max_stream_buffer_bytes,
            "max_total_bytes": cfg.max_buffer_bytes,
        }
        store = InMemoryStreamStore(**bounds)
        if cfg.redis_url is not None:
            # Imported only with --redis-url: the cluster modules import the server's.
            from tokenspout.cluster.replica import Replica

            self.cluster = Replica(cfg, self.metrics.registry)
            store = self.cluster.stream_store(**bounds)
        self.streams = StreamRegistry(
            self.engine,
            store=store,
            resume=ResumePolicy(grace_s=cfg.resume_grace_s, ttl_s=cfg.resume_ttl_s),
            on_end=self._stream_ended,
            read_elsewhere=None if self.cluster is None else self.cluster.read_elsewhere,
        )

    async def start_engine(self) -> None:
        """Start the engine unless it was: ``serve`` starts it before uvicorn's lifespan,
        which starts it otherwise."""
        if not self.engine_started:
            await self.engine.start()
            self.engine_started = True

    def _stream_ended(self, stream: Stream) -> None:
        stream_ended(self, stream)
        if self.cluster is not None:
            self.cluster.ended(stream)
        if stream.first_output_at is not None:
            self.metrics.queue_time.observe(stream.first_output_at - stream.opened_at)
        end = stream.end
        reason = stream.abort_reason
        if reason is None and end is not None and end.error is not None:
            reason = "error"
        if reason is not None:
            self.metrics.requests_aborted.labels(reason).inc()

    def served_names(self) -> tuple[str, ...]:
        return (*self.engine.served_models(), *self.config.model_aliases)


def state_of(conn: HTTPConnection) -> ServerState:
    state: ServerState = conn.app.state.tokenspout
    return state
