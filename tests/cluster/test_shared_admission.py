"""Admission counted in Redis, against a real Redis: a dead replica's streams count until
it is forgotten (whoever takes them over counts them first)."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import RedisServer
from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.redis_link import RedisLink
from tokenspout.cluster.shared_admission import SharedAdmission
from tokenspout.errors import OverloadedError


async def test_a_dead_replicas_streams_count_until_it_is_forgotten(
    redis_server: RedisServer,
) -> None:
    link = RedisLink(redis_server.url)
    try:
        admission = SharedAdmission(
            link, "me", max_streams=2, max_queued=8, generating=lambda: 0, queued=lambda: 0
        )
        client = link.client
        # "dead" generated two streams, and its lease lapsed long ago: nobody has taken
        # them over yet, and whoever does will run them again.
        await client.zadd(rk.REPLICAS, {"dead": 1})
        await client.hset(rk.ADMISSION, mapping={"s:dead": 2, "q:dead": 0})
        with pytest.raises(OverloadedError):
            await admission.admit(None, prompt_tokens=3)
        # Forgotten once its streams were taken over (and counted by the taker): they go.
        await client.zrem(rk.REPLICAS, "dead")
        await admission.admit(None, prompt_tokens=3)
        assert not await client.hexists(rk.ADMISSION, "s:dead")
    finally:
        await link.close()
