"""Admission counted across replicas: ``--max-streams``, ``--max-queued`` and the per-key
limits (concurrent streams, requests and tokens per minute), checked and counted in one
Redis script, so two replicas can never both take the last slot.

Each replica owns its own fields (``s:<replica>``: streams it generates, ``q:<replica>``:
requests queued in its engine; per key: the key's streams there) and sends its current
values with every check; the script adds the other replicas' fields, a dead replica's
too until it is forgotten: whoever takes its streams over counts them before it forgets it,
so a stream taken over never leaves room for another in between. The per-key minute limits
are token buckets kept in the key's hash, refilled on Redis's clock, as
``InMemoryKeyLimiter``'s are in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import Callable

from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.redis_link import LOST, RedisLink, execute
from tokenspout.errors import OverloadedError, RateLimitError
from tokenspout.server.api_keys import ApiKey

logger = logging.getLogger("tokenspout.cluster")

_ADMIT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now = now_ms / 1000
local me = ARGV[1]
local function others(hash, prefix)
  local total = 0
  local all = redis.call('HGETALL', hash)
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, #prefix) == prefix then
      local replica = string.sub(field, #prefix + 1)
      local lease = redis.call('ZSCORE', KEYS[1], replica)
      if replica ~= me and lease then
        -- Lapsed or not: a dead replica's streams count until it is forgotten.
        total = total + tonumber(all[i + 1])
      elseif not lease then
        -- A replica forgotten (dead, its streams taken over): its count goes. A live one
        -- writes its counts again within a second (after a Redis restart, say).
        redis.call('HDEL', hash, field)
      end
    end
  end
  return total
end
local function refill(level, at, per_minute)
  -- No refill time: the key had no such limit, only charges; its bucket starts full.
  if not level or not at then return per_minute end
  return math.min(per_minute, tonumber(level) + (now - tonumber(at)) * per_minute / 60)
end
local streams, queued = tonumber(ARGV[2]), tonumber(ARGV[4])
local total = others(KEYS[2], 's:') + streams
if total > tonumber(ARGV[3]) then return {1, total - 1, 1} end
local waiting = others(KEYS[2], 'q:') + queued
if waiting >= tonumber(ARGV[5]) then return {2, waiting, 2} end
if #KEYS == 3 then
  local mine, most = tonumber(ARGV[6]), tonumber(ARGV[7])
  local rpm, tpm, prompt = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
  local open = others(KEYS[3], 's:') + mine
  if most >= 0 and open > most then return {3, open - 1, 1} end
  local b = redis.call('HMGET', KEYS[3], 'rl', 'rt', 'tl', 'tt')
  local rl, tl
  if rpm >= 0 then
    -- One request, whatever its n (n streams count against the streams limit instead).
    rl = refill(b[1], b[2], rpm)
    if rl < 1 then return {4, 0, math.max(1, math.ceil((1 - rl) * 60 / rpm))} end
  end
  if tpm >= 0 then
    tl = refill(b[3], b[4], tpm)
    if tl <= 0 then return {5, 0, math.max(1, math.ceil((1 - tl) * 60 / tpm))} end
  end
  if rl then redis.call('HSET', KEYS[3], 'rl', tostring(rl - 1), 'rt', tostring(now)) end
  if tl then redis.call('HSET', KEYS[3], 'tl', tostring(tl - prompt), 'tt', tostring(now)) end
  redis.call('HSET', KEYS[3], 's:' .. me, mine)
end
redis.call('HSET', KEYS[2], 's:' .. me, streams, 'q:' .. me, queued)
return {0, 0, 0}
"""


def _limit(value: int | None) -> str:
    return "-1" if value is None else str(value)


class SharedAdmission:
    """``admit`` before a stream opens; ``adopt`` for a stream taken over; ``finished``
    when one of this replica's streams ends; ``publish`` sends this replica's counts."""

    def __init__(
        self,
        link: RedisLink,
        replica: str,
        *,
        max_streams: int,
        max_queued: int,
        generating: Callable[[], int],
        queued: Callable[[], int],
    ):
        self._link = link
        self._replica = replica
        self._max_streams = max_streams
        self._max_queued = max_queued
        self._generating = generating
        self._queued = queued
        #: Admissions between their check and their stream's opening.
        self._reserved = 0
        #: This replica's open streams per key name.
        self._keys: Tally[str] = Tally()
        #: Completion tokens to charge to keys' buckets at the next publish.
        self._charges: Tally[str] = Tally()
        self._script = link.client.register_script(_ADMIT)
        self._publishing: asyncio.Task[None] | None = None
        #: The counts changed since the last publish began.
        self._dirty = False

    async def admit(self, key: ApiKey | None, prompt_tokens: int, n: int = 1) -> None:
        """Count ``n`` new streams (and ``key``'s: ``n`` streams, one request, the prompt's
        tokens once), or raise 429 (``OverloadedError``, or ``RateLimitError`` for the key's own
        limits) with nothing counted; 503 without Redis."""
        self._reserved += n
        keys = [rk.REPLICAS, rk.ADMISSION]
        args = [self._replica, str(self._generating() + self._reserved), str(self._max_streams)]
        args += [str(self._queued()), str(self._max_queued)]
        if key is not None:
            self._keys[key.name] += n
            keys.append(rk.key(key.name))
            args += [str(self._keys[key.name]), _limit(key.max_concurrent_streams)]
            args += [_limit(key.requests_per_minute), _limit(key.tokens_per_minute)]
            args.append(str(prompt_tokens))
        try:
            code, count, retry = await self._link.call(lambda: self._script(keys=keys, args=args))
        except BaseException:
            self._release(key, n)
            raise
        finally:
            self._reserved -= n
        if code != 0:
            self._release(key, n)
            raise _refusal(int(code), int(count), int(retry), self, key)

    def _release(self, key: ApiKey | None, n: int) -> None:
        if key is not None:
            self._keys[key.name] -= n

    def adopt(self, key_name: str) -> None:
        """A stream of ``key_name`` taken over from a dead replica now counts here."""
        self._keys[key_name] += 1
        self.publish_soon()

    def finished(self, key_name: str, completion_tokens: int) -> None:
        self._keys[key_name] -= 1
        self._charges[key_name] += completion_tokens
        self.publish_soon()

    def publish_soon(self) -> None:
        """Publish the counts now, and again after a publish already under way (which may
        have read them before this change)."""
        self._dirty = True
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self._publish_while_dirty())

    async def _publish_while_dirty(self) -> None:
        while self._dirty:
            self._dirty = False
            await self.publish()

    async def publish(self) -> None:
        """Send this replica's counts (also after Redis came back empty)."""
        if not self._link.up:
            return
        me = self._replica
        charges, self._charges = self._charges, Tally()
        pipe = self._link.client.pipeline(transaction=False)
        pipe.hset(rk.ADMISSION, mapping={f"s:{me}": self._generating(), f"q:{me}": self._queued()})
        for name, count in self._keys.items():
            pipe.hset(rk.key(name), f"s:{me}", count)
        for name, tokens in charges.items():
            if tokens:
                pipe.hincrbyfloat(rk.key(name), "tl", -tokens)
        try:
            await execute(pipe)
        except LOST as exc:
            self._link.lost(exc)
            self._charges.update(charges)

    @property
    def max_streams(self) -> int:
        return self._max_streams

    @property
    def max_queued(self) -> int:
        return self._max_queued


def _refusal(
    code: int, count: int, retry: int, admission: SharedAdmission, key: ApiKey | None
) -> OverloadedError:
    if code == 1:
        return OverloadedError(
            f"{admission.max_streams} streams are open across the replicas; retry shortly",
            retry_after_s=retry,
        )
    if code == 2:
        return OverloadedError(
            f"{admission.max_queued} requests are already queued across the replicas; "
            "retry shortly",
            retry_after_s=retry,
        )
    assert key is not None
    if code == 3:
        return RateLimitError(
            f"key {key.name!r} has {count} streams open, its limit is "
            f"{key.max_concurrent_streams}; retry when one ends",
            retry_after_s=retry,
            limit="streams",
        )
    if code == 4:
        return RateLimitError(
            f"key {key.name!r} is over its {key.requests_per_minute} requests per minute",
            retry_after_s=retry,
            limit="requests",
        )
    return RateLimitError(
        f"key {key.name!r} is over its {key.tokens_per_minute} tokens per minute",
        retry_after_s=retry,
        limit="tokens",
    )
