"""This replica's connection to the shared Redis, and whether it is up.

redis-py reconnects by itself on the next command after a connection is lost; what it does
not do is tell the rest of the server. ``RedisLink`` runs every command that matters through
``call``: a connection or timeout error marks the link down (``tokenspout_redis_up`` 0) and
becomes ``RedisUnavailableError`` (HTTP 503), and a probe pings every half second until
Redis answers again, then tells the listeners (the writer catches up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenspout.errors import ConfigError, RedisUnavailableError
from tokenspout.url_address import address

logger = logging.getLogger("tokenspout.cluster")

T = TypeVar("T")

#: What a lost or unreachable Redis raises in redis-py.
LOST = (RedisConnectionError, RedisTimeoutError, OSError)
_PROBE_S = 0.5
#: Commands on a live connection answer in well under a millisecond: anything near this
#: means Redis is gone, and no operation should hang on it.
_SOCKET_TIMEOUT_S = 2.0
_MAX_CONNECTIONS = 64
#: How long a command waits for a free connection of the pool: a burst (hundreds of resumes
#: while a replica takes hundreds of streams over) waits its turn; with the socket timeout
#: here, it was "No connection available", taken for Redis lost (503 to the resumes).
_POOL_WAIT_S = 30.0


def check_reachable(url: str) -> None:
    """At start: ``ConfigError`` (one line, exit 2) unless ``url`` names a Redis that
    answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    except ValueError as exc:
        raise ConfigError(f"--redis-url {address(url)!r} is not a Redis URL: {exc}") from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise ConfigError(f"cannot reach Redis at {address(url)}: {exc}") from None
    finally:
        client.close()


class RedisLink:
    """One client (a connection pool) and the link's state."""

    def __init__(self, url: str, on_up: Callable[[], Awaitable[None]] | None = None):
        #: Where Redis is, for logs: the URL without its password.
        self.address = address(url)
        # Bursts of admissions wait for one of a bounded set of connections rather than
        # open hundreds at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_MAX_CONNECTIONS,
            timeout=_POOL_WAIT_S,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            health_check_interval=10,
            # One retry on a fresh connection: after a Redis restart the pooled ones are
            # dead, which is no reason to call Redis lost.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self.up = True
        self._on_up = on_up
        self._probe: asyncio.Task[None] | None = None

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one command (or pipeline); ``RedisUnavailableError`` while Redis is lost."""
        if not self.up:
            raise RedisUnavailableError(self._message())
        try:
            return await make()
        except LOST as exc:
            self.lost(exc)
            raise RedisUnavailableError(self._message()) from None

    def lost(self, exc: BaseException) -> None:
        """A command found Redis gone: mark the link down and start probing."""
        if self.up:
            logger.warning(
                "Redis at %s is unreachable (%s); streams go on from memory", self.address, exc
            )
        self.up = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._wait_up())

    async def _wait_up(self) -> None:
        # Until up for good: catching up (``on_up``) may find it gone again.
        while not self.up:
            await asyncio.sleep(_PROBE_S)
            try:
                await self.client.ping()
            except LOST:
                continue
            logger.warning("Redis at %s is reachable again", self.address)
            self.up = True
            if self._on_up is not None:
                await self._on_up()

    @staticmethod
    def _message() -> str:
        # Said to clients: where Redis is (and its password, in the URL) is not theirs.
        return (
            "this replica cannot reach its Redis right now; live streams go on, "
            "but this needs Redis: retry shortly"
        )

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.client.aclose()


async def execute(pipe: Pipeline) -> list[Any]:
    """Run a pipeline, and release its connection whatever happens."""
    try:
        return await pipe.execute()
    finally:
        await pipe.reset()
