"""The Redis link never shows the password of ``--redis-url``: not to clients, not in logs."""

from __future__ import annotations

import logging

import pytest

from tokenspout.cluster.redis_link import RedisLink
from tokenspout.errors import RedisUnavailableError

URL = "redis://:s3cretPW@127.0.0.1:1/0?password=otherPW"


async def test_a_lost_redis_is_told_without_its_password(caplog: pytest.LogCaptureFixture) -> None:
    link = RedisLink(URL)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(RedisUnavailableError) as refused:
            await link.call(link.client.ping)  # nothing listens on port 1
        message = refused.value.message
        assert "Redis" in message and "PW" not in message and "127.0.0.1" not in message
        assert link.address == "redis://127.0.0.1:1/0"
        assert any("redis://127.0.0.1:1/0" in r.getMessage() for r in caplog.records)
        assert not any("PW" in r.getMessage() for r in caplog.records)
    finally:
        await link.close()
