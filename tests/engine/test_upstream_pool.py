"""The balancer's choice and its queue, on upstreams whose health is set by hand (no
request is sent: picking is pure bookkeeping)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_pool import UpstreamPool
from tokenspout.errors import ConfigError, UpstreamError


def pool(n: int, max_concurrency: int = 2) -> UpstreamPool:
    urls = tuple(f"http://10.0.0.{i}:8000/v1" for i in range(n))
    p = UpstreamPool(UpstreamOptions(urls, max_concurrency=max_concurrency))
    for s in p.servers:
        s.healthy, s.models = True, frozenset({"m"})
    return p


async def test_least_outstanding_wins_and_ties_take_turns() -> None:
    p = pool(3)
    a, b, c = p.servers
    a.outstanding, b.outstanding = 1, 1
    assert await p.acquire("m") is c
    picks = [await p.acquire("m") for _ in range(3)]
    assert sorted(s.address for s in picks) == sorted([a.address, b.address, c.address])


async def test_an_upstream_failed_on_is_avoided_unless_it_is_the_only_one() -> None:
    p = pool(2)
    a, b = p.servers
    assert await p.acquire("m", avoid=[a]) is b
    b.healthy = False
    assert await p.acquire("m", avoid=[a]) is a


async def test_full_upstreams_make_requests_wait_counted() -> None:
    p = pool(1, max_concurrency=1)
    (a,) = p.servers
    assert await p.acquire("m") is a
    waiter = asyncio.create_task(p.acquire("m"))
    await asyncio.sleep(0)
    assert p.waiting == 1 and not waiter.done()
    p.release(a)
    assert await waiter is a and p.waiting == 0


async def test_a_waiter_that_leaves_is_no_longer_counted() -> None:
    p = pool(1, max_concurrency=1)
    await p.acquire("m")
    waiter = asyncio.create_task(p.acquire("m"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert p.waiting == 0


async def test_no_healthy_upstream_for_the_model_is_a_503() -> None:
    p = pool(2)
    with pytest.raises(UpstreamError, match="no healthy upstream serves model 'x'") as err:
        await p.acquire("x")
    # Retry after the next health check (the interval, 5 s, before the loop runs).
    assert (err.value.status_code, err.value.retry_after_s) == (503, 5)
    for s in p.servers:
        s.healthy = False
    assert p.failure is not None and "10.0.0.1" in p.failure


def test_options_refuse_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        UpstreamOptions(())
    with pytest.raises(ConfigError, match="http"):
        UpstreamOptions(("ftp://x/v1",))
    # The value as given ('://notaurl' before), but never a password in it.
    with pytest.raises(ConfigError, match="not 'notaurl'"):
        UpstreamOptions(("notaurl",))
    with pytest.raises(ConfigError) as error:
        UpstreamOptions(("ftp://u:pw@x/v1",))
    assert "pw" not in str(error.value)
    with pytest.raises(ConfigError, match="http://h:1/v1 is given twice"):
        UpstreamOptions(("http://h:1/v1", "http://h:2/v1", "http://H:1/v1/"))
    secret = UpstreamOptions(("http://u:pw@h:1/v1",), api_key="sk-secret")
    assert "sk-secret" not in repr(secret)
    for timeout in ("health_interval_s", "first_token_timeout_s", "stall_timeout_s"):
        for bad in (0.0, float("nan")):
            with pytest.raises(ConfigError, match="must be > 0"):
                UpstreamOptions(("http://h:1/v1",), **{timeout: bad})  # type: ignore[arg-type]


def test_a_base_url_without_a_path_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # llama-server answers chat at its root too, and completions there in its own shape: a
    # base without /v1 worked for chat and failed for completions (502, malformed chunks).
    with caplog.at_level(logging.WARNING, logger="tokenspout.engine.upstream_options"):
        UpstreamOptions(("http://u:pw@h:1/v1", "http://h:2/v1/"))
        assert not caplog.records
        UpstreamOptions(("http://u:pw@h:1/",))
    (record,) = caplog.records
    assert "did you mean http://h:1/v1?" in record.getMessage()
    assert "pw" not in record.getMessage()


def test_passive_failures_never_eject_the_last_healthy_upstream() -> None:
    p = pool(2)
    a, b = p.servers
    for _ in range(3):
        p.failed(a, "connect error")
    assert not a.healthy and b.healthy
    for _ in range(5):
        p.failed(b, "connect error")
    assert b.healthy, "ejecting it would refuse every request until the next health check"
