"""Run the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

On the signal uvicorn stops accepting connections and waits for open ones; we mark the
server as draining (new requests on kept-alive connections get 503), let running streams
finish for up to ``drain_timeout_s``, then end the rest with an error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from tokenspout.errors import ShuttingDownError
from tokenspout.server.connection_limits import uvicorn_options
from tokenspout.server.server_state import ServerState

logger = logging.getLogger("tokenspout")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with our drain step before its own shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if self._state.config.api_keys_file is not None:
            # Re-read the keys file on SIGHUP; open streams are not touched.
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._state.keys.reload)

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._state.draining = True
        timeout = self._state.config.drain_timeout_s
        running = len(self._state.streams.running())
        if running:
            logger.info("draining %d stream(s) for up to %.0f s", running, timeout)
        drain = asyncio.create_task(self._end_streams_after(timeout))
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    async def _end_streams_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        streams = self._state.streams.running()
        if streams:
            logger.info("drain timeout: ending %d stream(s)", len(streams))
        for stream in streams:
            stream.fail(ShuttingDownError("the server is shutting down"), "shutdown")


def serve(
    app: object, state: ServerState, *, host: str, port: int, log_level: str = "info"
) -> None:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=log_level,
        # Our own drain ends streams; this is only the last resort after it.
        timeout_graceful_shutdown=int(state.config.drain_timeout_s) + 5,
        **uvicorn_options(state.config),
    )
    DrainingServer(config, state).run()
