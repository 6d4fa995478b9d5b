"""Run the app under uvicorn with a graceful drain on SIGTERM/SIGINT, and the process-wide
tuning that only a server process should get.

On the signal we stop accepting connections, close the idle kept-alive HTTP connections
(busy ones close after their response) and mark the server as draining (a request that
still comes gets 503, a new WebSocket stream an error), let running streams
finish for up to ``drain_timeout_s``, then end the rest with an error — an error event and
``[DONE]`` over HTTP, an ``error`` message over a WebSocket — and only then let uvicorn
close the connections (a WebSocket gets close code 1012 after its error message). A drain
is the designed way to stop, so the process then exits with 0. A replica sharing streams
through Redis first hands those it shares over to the other replicas, if any is alive
(``Replica.hand_over``): their readers' connections are cut without an end, and their
clients resume where the streams go on.

A second SIGINT (Ctrl-C) during the drain is uvicorn's "force quit": the drain ends at once,
as at its timeout, and the app's shutdown (engine, Redis writer, tracing) still runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

from tokenspout.errors import ShuttingDownError
from tokenspout.server.connection_limits import uvicorn_options
from tokenspout.server.cut_responses import quiet_purposeful_cuts
from tokenspout.server.log_redaction import redact_key_params
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream

logger = logging.getLogger("tokenspout")

#: How long the streams ended at the drain timeout get to send their error and [DONE].
_FAREWELL_S = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with our drain step before its own shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state
        #: Set on a second SIGINT (uvicorn's ``force_exit``): the drain stops waiting.
        self._forced = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        # Re-read the keys file on SIGHUP; open streams are not touched. Without a keys
        # file it is ignored (logged), not the default action: a reload-minded supervisor
        # must not kill the server. Installed before "Uvicorn running" is printed.
        self._loop.add_signal_handler(signal.SIGHUP, self._state.keys.reload)
        # The engine loads before the lifespan: a model that cannot load (a damaged file,
        # a KV cache past the memory) leaves ``serve`` as its exception, which the command
        # reports in one line; raised in the lifespan, uvicorn logged it as a traceback and
        # exited with 3.
        await self._state.start_engine()
        await super().startup(sockets)
        tune_gc()

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        if self._state.config.ssl_certfile is None:
            super()._log_started_message(listeners)
            return
        # uvicorn names the scheme after its own TLS; ours is TlsHandshake (uvicorn_options).
        host, port = listeners[0].getsockname()[:2]
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on https://%s:%d (Press CTRL+C to quit)",
            f"[{host}]" if ":" in host else host,
            port,
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self._state
        state.draining = True
        for server in self.servers:
            server.close()
        self._close_kept_alive()
        if self.force_exit:  # both signals came before the loop was running
            self._forced.set()
        await drain(state, self._forced)
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown on a forced exit; ours ends what the drain
            # left (the engine thread, the Redis writer's flush, the trace exporter), and
            # its lifespan task, never told to end, was cancelled with a traceback.
            await self.lifespan.shutdown()
        # A drain is the designed way to stop: no re-raised signal, exit status 0.
        self._captured_signals.clear()

    def _close_kept_alive(self) -> None:
        """End HTTP keep-alive now (uvicorn's own step, which comes after our drain): a
        balancer sent new requests over its idle connections to this draining replica,
        which could only answer 503 (nginx does not try another replica then). Closed, its
        next attempt connects, is refused, and goes to another. Busy connections close after
        their response; WebSockets are left to the drain."""
        for connection in list(self.server_state.connections):
            if not isinstance(connection, WebSocketsSansIOProtocol):
                connection.shutdown()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.force_exit and self._loop is not None:
            # A signal handler runs between two bytecodes of the loop's thread: hand the
            # wake-up to the loop rather than touch the event's waiters from here.
            self._loop.call_soon_threadsafe(self._forced.set)


async def drain(state: ServerState, forced: asyncio.Event) -> None:
    """Let running streams finish for up to the drain timeout, or until ``forced`` is set,
    then hand the shared ones over to other replicas, end the rest with an error, and give
    their readers a moment to send it."""
    registry = state.streams
    timeout = state.config.drain_timeout_s
    if state.cluster is not None:
        await state.cluster.drain_begins(timeout)
    running = registry.running()
    if running and not forced.is_set():
        logger.info("draining %d stream(s) for up to %.0f s", len(running), timeout)
        await _wait_for_ends(running, forced, timeout_s=timeout)
    cut = registry.running()
    if state.cluster is not None:
        handed = await state.cluster.hand_over(_end)
        cut = [s for s in cut if s not in handed]
        state.cluster.cut_mirror_readers()
    if cut:
        why = "forced quit" if forced.is_set() else "drain timeout"
        logger.info("%s: ending %d stream(s)", why, len(cut))
    for stream in cut:
        _end(stream)
    await registry.wait_readers_gone(_FAREWELL_S)


def _end(stream: Stream) -> None:
    """How a drain ends a stream it does not hand over (a no-op on one already ended)."""
    stream.fail(ShuttingDownError("the server is shutting down"), "shutdown")


async def _wait_for_ends(streams: list[Stream], forced: asyncio.Event, *, timeout_s: float) -> None:
    """Until every stream has ended, ``forced`` is set, or ``timeout_s``."""
    ends = [asyncio.ensure_future(s.wait_end()) for s in streams]
    waits = (asyncio.ensure_future(asyncio.wait(ends)), asyncio.ensure_future(forced.wait()))
    await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for future in (*ends, *waits):
        future.cancel()


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with a shutdown that tolerates a connection whose
    client has begun the closing handshake: uvicorn's own sends another close frame, which
    the websockets library refuses (``InvalidState``), and the exception aborted the whole
    server shutdown (exit status 1). Such a connection only needs its transport closed.

    And a handshake refused with an HTTP answer (403 for a foreign ``Origin`` or ``Host``,
    401) counts as completed: uvicorn logged "ASGI callable returned without completing
    handshake" at ERROR for every one, after sending it."""

    def shutdown(self) -> None:
        try:
            super().shutdown()
        except InvalidState:
            self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True


def tune_gc() -> None:
    """What start-up built (the framework, a model's modules) lives as long as the server:
    moved out of the collector's sight, it is not traversed again by every full collection
    while streams allocate (as vLLM does after loading). Streaming allocates a few small
    tuples per token; young collections every 700 of them (the default) were 7% of the CPU
    at 400 streams. Process-wide, so only for a server process, never in ``create_app``."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def serve(
    app: object, state: ServerState, *, host: str, port: int, log_level: str = "info"
) -> None:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=log_level,
        ws=WebSocketProtocol,
        # Our own drain ends streams first; this is only the last resort after it.
        timeout_graceful_shutdown=int(state.config.drain_timeout_s + _FAREWELL_S) + 5,
        **uvicorn_options(state),
    )
    redact_key_params(state.config.log_prompts)
    quiet_purposeful_cuts()
    DrainingServer(config, state).run()
