"""``DisconnectWatch`` with hand-written ASGI ``receive`` callables, on the fake clock: the
body ends by itself, or the client leaves, or the send watchdog interrupts it, or the server
cancels the whole response."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.fake_clock import run
from tests.streaming.stream_fakes import until
from tokenspout.server.disconnect import DisconnectWatch


class Client:
    """An ASGI ``receive``: each message is handed over at the loop time it is scripted for;
    after the script it waits forever (as for a client that stays). Counts the waits that
    were cancelled."""

    def __init__(self, script: list[tuple[float, dict[str, Any]]] | None = None):
        self.script = list(script or [])
        self.calls = 0
        self.cancelled = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if self.script:
            when, message = self.script.pop(0)
            loop.call_at(when, future.set_result, message)
        try:
            return await future
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class Body:
    """A response body that runs until ``until`` (or forever), recording how it ended."""

    def __init__(self, until: float | None = None, fail: Exception | None = None):
        self.until = until
        self.fail = fail
        self.outcome = "not started"

    async def __call__(self) -> str:
        loop = asyncio.get_running_loop()
        self.outcome = "running"
        future: asyncio.Future[None] = loop.create_future()
        if self.until is not None:
            loop.call_at(self.until, future.set_result, None)
        try:
            await future
        except asyncio.CancelledError:
            self.outcome = f"cancelled at {loop.time()}"
            raise
        if self.fail is not None:
            raise self.fail
        self.outcome = f"done at {loop.time()}"
        return "body result"


async def idle() -> None:
    """Return once every other task has run and waits (the fake clock moves only then)."""
    await until(asyncio.get_running_loop().time() + 1.0)


DISCONNECT = {"type": "http.disconnect"}
REQUEST = {"type": "http.request", "body": b"", "more_body": False}


def test_a_body_that_ends_by_itself_returns_none_and_stops_listening() -> None:
    async def main() -> tuple[str | None, str, int]:
        client, body = Client(), Body(until=5.0)
        watch = DisconnectWatch(client)
        reason = await watch.run(body())
        await idle()
        return reason, body.outcome, client.cancelled

    assert run(main()) == (None, "done at 5.0", 1)


def test_the_client_leaving_cancels_the_body() -> None:
    async def main() -> tuple[str | None, str | None, str]:
        client, body = Client([(3.0, DISCONNECT)]), Body()
        watch = DisconnectWatch(client)
        reason = await watch.run(body())
        return reason, watch.reason, body.outcome

    assert run(main()) == ("client_disconnect", "client_disconnect", "cancelled at 3.0")


def test_other_messages_are_not_a_disconnect() -> None:
    async def main() -> tuple[str | None, str, int]:
        client = Client([(1.0, REQUEST), (2.0, REQUEST), (7.0, DISCONNECT)])
        body = Body()
        reason = await DisconnectWatch(client).run(body())
        return reason, body.outcome, client.calls

    assert run(main()) == ("client_disconnect", "cancelled at 7.0", 3)


def test_a_disconnect_after_the_body_ended_changes_nothing() -> None:
    async def main() -> tuple[str | None, str]:
        client, body = Client([(9.0, DISCONNECT)]), Body(until=4.0)
        watch = DisconnectWatch(client)
        reason = await watch.run(body())
        watch.interrupt("send_timeout")  # too late as well
        return reason, body.outcome

    assert run(main()) == (None, "done at 4.0")


def test_interrupt_stops_the_body_with_its_reason_and_only_the_first_counts() -> None:
    async def main() -> tuple[str | None, str]:
        client, body = Client([(8.0, DISCONNECT)]), Body()
        watch = DisconnectWatch(client)
        loop = asyncio.get_running_loop()
        loop.call_at(2.0, watch.interrupt, "send_timeout")
        loop.call_at(2.0, watch.interrupt, "client_disconnect")
        reason = await watch.run(body())
        return reason, body.outcome

    assert run(main()) == ("send_timeout", "cancelled at 2.0")


def test_a_body_error_is_raised_to_the_caller() -> None:
    async def main() -> None:
        client = Client()
        watch = DisconnectWatch(client)
        with pytest.raises(ValueError, match="a bug"):
            await watch.run(Body(until=1.0, fail=ValueError("a bug"))())
        assert watch.reason is None
        await idle()
        assert client.cancelled == 1

    run(main())


def test_the_server_cancelling_the_response_propagates() -> None:
    async def main() -> tuple[str, str]:
        body = Body()
        watch = DisconnectWatch(Client())
        task = asyncio.create_task(watch.run(body()))
        asyncio.get_running_loop().call_at(5.0, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        return body.outcome, str(watch.reason)

    assert run(main()) == ("cancelled at 5.0", "None")


def test_the_server_cancelling_as_the_client_leaves_still_propagates() -> None:
    async def main() -> str:
        body = Body()
        watch = DisconnectWatch(Client())
        task = asyncio.create_task(watch.run(body()))

        def both() -> None:
            watch.interrupt("client_disconnect")
            task.cancel()  # shutdown, at the same moment

        asyncio.get_running_loop().call_at(5.0, both)
        with pytest.raises(asyncio.CancelledError):
            await task
        return body.outcome

    assert run(main()) == "cancelled at 5.0"
