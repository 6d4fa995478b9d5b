"""One task that follows every mirrored stream of this replica in Redis.

A blocking ``XREAD`` holds a connection while it waits, so one per mirror would take a
connection each: this feed reads all mirrored streams in one ``XREAD`` (up to 100 ms of
blocking, so that a mirror added meanwhile is read from the next call on) and hands each
mirror its entries. A paused mirror (its readers are behind) is left out until it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from tokenspout.cluster.redis_link import LOST, RedisLink

_BLOCK_MS = 100
_RETRY_S = 0.5


class Follower(Protocol):
    key: str
    last: bytes
    running: bool

    def take(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None: ...


class MirrorFeed:
    def __init__(self, link: RedisLink):
        self._link = link
        self._followers: dict[str, Follower] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, follower: Follower) -> None:
        self._followers[follower.key] = follower
        self.wake()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def remove(self, follower: Follower) -> None:
        if self._followers.get(follower.key) is follower:
            del self._followers[follower.key]

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        client = self._link.client
        while True:
            wanted = {key: f.last for key, f in self._followers.items() if f.running}
            if not wanted:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                answer = await client.xread(wanted, count=256, block=_BLOCK_MS)
            except LOST as exc:
                self._link.lost(exc)
                await asyncio.sleep(_RETRY_S)
                continue
            for key, entries in answer:
                follower = self._followers.get(key.decode())
                if follower is None:
                    continue
                for entry_id, fields in entries:
                    follower.take(entry_id, fields)
                    follower.last = entry_id

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
