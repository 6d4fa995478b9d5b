"""The upstreams together: which one takes a request, admission per upstream, health.

A request goes to the healthy upstream that serves its model with the fewest requests in
flight (least outstanding requests), preferring one it has not failed on yet. When every
such upstream has ``--upstream-max-concurrency`` requests in flight, it waits here, in
tokenspout's queue (counted as waiting), until one finishes or health changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Collection

from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_server import UpstreamServer
from tokenspout.errors import UpstreamError

logger = logging.getLogger(__name__)


class UpstreamPool:
    """Every upstream of one engine, their health loop and the requests waiting for one."""

    def __init__(self, options: UpstreamOptions):
        self.servers = [UpstreamServer(url, options) for url in options.urls]
        self._interval_s = options.health_interval_s
        #: Requests waiting for room; each is woken when room or health may have changed.
        self._waiters: list[asyncio.Future[None]] = []
        self.waiting = 0
        self._rotation = itertools.count()
        self._health: asyncio.Task[None] | None = None
        #: When the health loop checks next (``time.monotonic``), once it runs.
        self._next_check_at: float | None = None

    async def start(self) -> None:
        """Check every upstream once, then keep checking in the background."""
        await self.check_all()
        self._health = asyncio.create_task(self._health_loop(), name="tokenspout-upstream-health")

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for server in self.servers:
            await server.close()

    def models(self) -> tuple[str, ...]:
        """The model ids the upstreams serve, in the order the upstreams were given."""
        seen: dict[str, None] = {}
        for server in self.servers:
            seen.update(dict.fromkeys(sorted(server.models)))
        return tuple(seen)

    def context_length(self, model: str) -> int | None:
        """The context length of ``model`` as its upstreams report it: the shortest, since a
        request may go to any of them; None when none reports one."""
        lengths = [s.context_lengths[model] for s in self.servers if model in s.context_lengths]
        return min(lengths, default=None)

    @property
    def synthetic(self) -> bool:
        """Whether an answer may come from a synthetic engine (an upstream that is one)."""
        return any(s.synthetic for s in self.servers)

    @property
    def failure(self) -> str | None:
        """Why nothing can be served now (no upstream healthy), or None."""
        if any(s.healthy for s in self.servers):
            return None
        return "no upstream is healthy: " + ", ".join(s.address for s in self.servers)

    @property
    def retry_after_s(self) -> int:
        """Seconds until the next health check, which may find an upstream back (at least
        1): the ``Retry-After`` of a 503 for want of a healthy one."""
        if self._next_check_at is None:
            return max(1, math.ceil(self._interval_s))
        return max(1, math.ceil(self._next_check_at - time.monotonic()))

    async def acquire(self, model: str, avoid: Collection[UpstreamServer] = ()) -> UpstreamServer:
        """An upstream for ``model`` with room, counted as outstanding until ``release``.
        Waits while every candidate is full; ``UpstreamError`` (503) when none is
        healthy. ``avoid``: upstreams this request failed on, taken only when no other
        healthy one serves the model."""
        waited = False
        try:
            while True:
                server = self._pick(model, avoid)
                if server is not None:
                    server.outstanding += 1
                    return server
                if not waited:
                    waited = True
                    self.waiting += 1
                woken = asyncio.get_running_loop().create_future()
                self._waiters.append(woken)
                try:
                    await woken
                finally:
                    if not woken.done():
                        self._waiters.remove(woken)
        finally:
            if waited:
                self.waiting -= 1

    def failed(self, server: UpstreamServer, why: str) -> None:
        """A request failed at ``server`` (connect error, 5xx, 401, 403): passive health.
        The last healthy upstream is not ejected this way, as a load balancer's panic
        threshold keeps it: a burst of failures under load would otherwise refuse every
        request until the next health check; one that is really down fails its checks
        instead."""
        others = any(s.healthy for s in self.servers if s is not server)
        server.failed(why, may_eject=others)

    def release(self, server: UpstreamServer) -> None:
        server.outstanding -= 1
        self._wake()

    def _pick(self, model: str, avoid: Collection[UpstreamServer]) -> UpstreamServer | None:
        serving = [s for s in self.servers if s.healthy and s.serves(model)]
        if not serving:
            raise UpstreamError(
                f"no healthy upstream serves model {model!r} now; upstreams: "
                + ", ".join(s.address for s in self.servers),
                status_code=503,
                code="upstream_unavailable",
                retry_after_s=self.retry_after_s,
            )
        fresh = [s for s in serving if s not in avoid] or serving
        free = [s for s in fresh if s.has_room]
        if not free:
            return None
        # Least outstanding; ties go round in turn so that idle upstreams share the load.
        turn, n = next(self._rotation), len(self.servers)
        return min(free, key=lambda s: (s.outstanding, (self.servers.index(s) - turn) % n))

    def _wake(self) -> None:
        # Every waiter looks again: they may want different models, so handing the room to
        # the first in line could leave it unused.
        waiters, self._waiters = self._waiters, []
        for woken in waiters:
            if not woken.done():
                woken.set_result(None)

    async def check_all(self) -> None:
        await asyncio.gather(*(s.check() for s in self.servers))
        self._wake()

    async def _health_loop(self) -> None:
        while True:
            self._next_check_at = time.monotonic() + self._interval_s
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_all()
            except Exception:
                logger.exception("upstream health check failed")
