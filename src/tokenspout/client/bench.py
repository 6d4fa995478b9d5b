"""The load generator behind ``tokenspout bench``.

Sends ``num_prompts`` streamed requests to an OpenAI-compatible server (ours, vLLM,
llama.cpp, Ollama's ``/v1``) over SSE, or to ours over NDJSON or ``/v1/ws``, at most
``concurrency`` at a time, all at once or as a seeded Poisson process, and times every
output-carrying chunk on the client's clock. The statistics are in ``bench_metrics``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from tokenspout.client.bench_metrics import RequestResult, summarize
from tokenspout.client.chunk_reader import StreamError, StreamResult, read_event
from tokenspout.client.client import server_root
from tokenspout.engine.interface import SYNTHETIC_OWNER
from tokenspout.protocols.event_id import parse_event_id


class BenchEndpoint(StrEnum):
    """The API a benchmark sends its requests to (``--endpoint``)."""

    chat = "chat"
    completions = "completions"
    #: The seed article's ``/v1/completions/stream`` (``{"token": ...}`` events, no usage).
    seed = "seed"


class BenchProtocol(StrEnum):
    """How a benchmark's streams reach it (``--protocol``)."""

    sse = "sse"
    ndjson = "ndjson"
    #: tokenspout's ``/v1/ws``.
    ws = "ws"


_PATHS = {
    BenchEndpoint.chat: "/v1/chat/completions",
    BenchEndpoint.completions: "/v1/completions",
    BenchEndpoint.seed: "/v1/completions/stream",
}


#: How every output of a run against the synthetic engine names it.
SYNTHETIC_TITLE = "SYNTHETIC engine (not a language model)"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark's settings; ``concurrency`` is given per run."""

    url: str = "http://127.0.0.1:8000"
    endpoint: BenchEndpoint = BenchEndpoint.chat
    protocol: BenchProtocol = BenchProtocol.sse
    num_prompts: int = 16
    max_tokens: int = 128
    #: Requests per second of a Poisson process; ``inf`` sends them all at once.
    request_rate: float = float("inf")
    seed: int = 0
    prompt: str = "Write a long story about a dragon and a knight."
    #: Number each request's prompt ("Request 3. " + prompt) so that no two are the same:
    #: identical prompts share their first token's computation on some servers (ours).
    distinct_prompts: bool = False
    temperature: float = 0.8
    ignore_eos: bool = False
    model: str | None = None
    #: The server said it serves the model with tokenspout's synthetic engine (labelled).
    synthetic: bool = False
    api_key: str | None = None
    #: Limit for one request, start to end.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        # Plain strings ("ws") are accepted and stored as the enums (ValueError otherwise).
        object.__setattr__(self, "endpoint", BenchEndpoint(self.endpoint))
        object.__setattr__(self, "protocol", BenchProtocol(self.protocol))
        if self.num_prompts < 1 or self.max_tokens < 1:
            raise ValueError("num_prompts and max_tokens must be >= 1")
        if not self.request_rate > 0:  # NaN too
            raise ValueError("request_rate must be > 0 (inf: all at once)")
        # Refused here, not by every request failing (NaN cannot be sent in JSON; a limit
        # of 0 or NaN times every request out).
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"--temperature must be a finite number >= 0, not {self.temperature}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be > 0, not {self.timeout_s}")
        if self.ignore_eos and self.endpoint is BenchEndpoint.seed:
            # Not sent quietly without it: "exactly max_tokens" would not hold.
            raise ValueError("ignore_eos: the seed endpoint has no such field")
        if self.endpoint is BenchEndpoint.seed and self.protocol is not BenchProtocol.sse:
            # Its events carry no token counts but the SSE ids' stream positions (an event
            # may hold several tokens: those of one UTF-8 character), and its NDJSON no end.
            raise ValueError("the seed endpoint is measured over SSE only: use --protocol sse")
        server_root(self.url)  # ValueError for a URL that cannot be used

    @property
    def base_url(self) -> str:
        """The server root: a trailing ``/v1`` (Ollama's documented base URL) is dropped."""
        return server_root(self.url)


def request_body(config: BenchConfig, index: int = 0) -> dict[str, Any]:
    """The JSON of request ``index`` (the same for every request of a run unless
    ``distinct_prompts``)."""
    body: dict[str, Any] = {"max_tokens": config.max_tokens, "temperature": config.temperature}
    if config.model is not None:
        body["model"] = config.model
    prompt = f"Request {index + 1}. {config.prompt}" if config.distinct_prompts else config.prompt
    if config.endpoint is BenchEndpoint.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if config.endpoint is BenchEndpoint.seed:
        # One event per token where the text allows, as in the seed article's endpoint
        # (the tokens are counted from the events' ids: see _http_request).
        body["stream_options"] = {"flush_tokens": 1, "flush_ms": 0}
    else:
        body["stream"] = True
        # The server's own token count; servers that ignore it leave us counting chunks.
        body["stream_options"] = {"include_usage": True}
        if config.ignore_eos:
            body["ignore_eos"] = True  # vLLM / llama.cpp / tokenspout extension
    return body


class _Recorder:
    """Times one request's output chunks into a ``RequestResult``."""

    def __init__(self) -> None:
        self.result = RequestResult()
        self.chunks = 0
        self.usage_tokens: int | None = None
        self._start = time.perf_counter()
        self._last: float | None = None

    def output(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.result.ttft = now - self._start
        else:
            self.result.itl.append(now - self._last)
        self._last = now
        self.result.e2el = now - self._start
        self.chunks += 1

    def finish(self) -> RequestResult:
        self.result.success = True
        self.result.output_tokens = (
            self.usage_tokens if self.usage_tokens is not None else self.chunks
        )
        return self.result


async def _payloads(response: httpx.Response, sse: bool) -> AsyncIterator[tuple[str, str]]:
    """The field name and value of each SSE ``data:`` or ``id:`` line, or ``("data",
    line)`` for each NDJSON line."""
    async for line in response.aiter_lines():
        if sse:
            name, colon, value = line.partition(":")
            if colon and name in ("data", "id"):
                # WHATWG SSE: one optional space after the colon belongs to the framing.
                yield name, value.removeprefix(" ")
        elif line.strip():
            yield "data", line


def _stream_position(event_id: str) -> int | None:
    """The tokens streamed so far, from a tokenspout event id ``<stream>:<position>`` (an
    end event's ``<position>.<n>``); None for another server's id."""
    try:
        return parse_event_id(event_id).position
    except ValueError:
        return None


async def _http_request(
    client: httpx.AsyncClient, config: BenchConfig, body: dict[str, Any]
) -> RequestResult:
    sse = config.protocol is BenchProtocol.sse
    accept = "text/event-stream" if sse else "application/x-ndjson"
    rec = _Recorder()
    state = StreamResult()
    async with client.stream(
        "POST", _PATHS[config.endpoint], json=body, headers={"Accept": accept}
    ) as response:
        if response.status_code >= 400:
            text = (await response.aread()).decode("utf-8", "replace")
            raise StreamError(f"HTTP {response.status_code}: {text[:200]}")
        position = None
        async for name, value in _payloads(response, sse):
            if name == "id":
                position = _stream_position(value)
            elif read_event(state, value):
                rec.output()
    if sse and state.total_s is None:  # a clean close before [DONE] (a proxy's): cut short
        raise StreamError("the stream ended before [DONE]")
    if not sse and state.finish_reason is None:  # NDJSON's end is the body's: cut short
        raise StreamError("the stream ended without a finish_reason")
    if state.usage and "completion_tokens" in state.usage:
        rec.usage_tokens = int(state.usage["completion_tokens"])
    elif config.endpoint is BenchEndpoint.seed and position is not None:
        rec.usage_tokens = position
    return rec.finish()


def _ws_url(config: BenchConfig) -> str:
    parts = urlsplit(config.base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path + "/v1/ws", "", ""))


async def _ws_request(config: BenchConfig, body: dict[str, Any], request_id: str) -> RequestResult:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    message = {"type": "generate", "id": request_id, **body}
    message.pop("stream", None)
    message.pop("stream_options", None)
    rec = _Recorder()
    async with connect(_ws_url(config), additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps(message))
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "delta" and msg.get("text"):
                rec.output()
            elif kind == "done":
                usage = msg.get("usage") or {}
                if "completion_tokens" in usage:
                    rec.usage_tokens = int(usage["completion_tokens"])
                return rec.finish()
            elif kind == "error":
                raise StreamError((msg.get("error") or {}).get("message", "stream error"))
    raise StreamError("the WebSocket closed before the stream was done")


def _arrival_delays(config: BenchConfig) -> list[float]:
    """Seconds to wait before each request is sent: a seeded Poisson process (exponential
    gaps), or zeros when all are sent at once."""
    if config.request_rate == float("inf"):
        return [0.0] * config.num_prompts
    rng = random.Random(config.seed)
    return [rng.expovariate(config.request_rate) for _ in range(config.num_prompts)]


@dataclass
class LevelResult:
    """One concurrency level: the figures, and the raw per-request results (for plots)."""

    concurrency: int
    summary: dict[str, Any]
    results: list[RequestResult]


async def run_level(
    config: BenchConfig,
    concurrency: int,
    slos: dict[str, float] | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> LevelResult:
    """Send every request of ``config`` with at most ``concurrency`` in flight."""
    # Built before the clock starts: a request's own JSON is not part of its latency.
    bodies = [request_body(config, i) for i in range(config.num_prompts)]
    slots = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # A fresh connection per request: a server that closes idle keep-alive connections
    # (llama-server does) races a pooled one, and the request fails without a response.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)

    async with httpx.AsyncClient(
        base_url=config.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:

        async def one(index: int) -> RequestResult:
            async with slots:
                limit = asyncio.timeout(config.timeout_s)
                try:
                    body = bodies[index]
                    async with limit:
                        if config.protocol is BenchProtocol.ws:
                            result = await _ws_request(config, body, f"bench-{index}")
                        else:
                            result = await _http_request(client, config, body)
                except Exception as exc:  # a failed request is a figure, not a crash
                    error = f"{type(exc).__name__}: {exc}"
                    if limit.expired():  # asyncio's TimeoutError says nothing
                        error = f"timed out after --timeout-s {config.timeout_s:g}"
                    result = RequestResult(error=error[:300])
            if on_done is not None:
                on_done(result)
            return result

        tasks: list[asyncio.Task[RequestResult]] = []
        # A garbage collection in the middle of a burst delays every request's reads: with
        # the CLI's modules loaded a full one took 10-20 ms, and TTFT p50 of 16 requests at
        # once against the synthetic engine (TTFT 0) read 25-35 ms, 11-12 ms with the
        # objects there before the level frozen (the server does the same at start).
        gc.collect()
        gc.freeze()
        try:
            started = time.perf_counter()
            for index, delay in enumerate(_arrival_delays(config)):
                if delay:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(index)))
            results = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - started
        finally:
            gc.unfreeze()
    summary = {"concurrency": concurrency, **summarize(results, duration, slos)}
    return LevelResult(concurrency, summary, results)


async def discover_model(config: BenchConfig) -> BenchConfig:
    """``config`` with its model (the first ``GET /v1/models`` lists, when not given: vLLM
    and Ollama need one in the body) and whether the server serves it with tokenspout's
    synthetic engine, which every result must say. Unchanged when the server does not say.
    The seed endpoint (ours) is asked too, for the label; its requests keep naming no model
    unless given one (the server then serves its own, the first it lists)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        async with httpx.AsyncClient(base_url=config.base_url, headers=headers) as client:
            response = await client.get("/v1/models", timeout=10.0)
            entries = [e for e in response.json()["data"] if isinstance(e, dict)]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return config
    if config.model is None and not entries:
        return config
    model = config.model if config.model is not None else str(entries[0].get("id"))
    entry = next((e for e in entries if e.get("id") == model), {})
    synthetic = entry.get("owned_by") == SYNTHETIC_OWNER
    if config.endpoint is BenchEndpoint.seed and config.model is None:
        return replace(config, synthetic=synthetic)
    return replace(config, model=model, synthetic=synthetic)


async def run_sweep(
    config: BenchConfig,
    concurrencies: list[int],
    slos: dict[str, float] | None = None,
    on_done: Callable[[int, RequestResult], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> list[LevelResult]:
    """One run per concurrency level, in order; ``on_start(concurrency)`` before a level
    and ``on_done(concurrency, result)`` after every request (the progress bar)."""
    levels = []
    for concurrency in concurrencies:
        if on_start is not None:
            on_start(concurrency)
        callback = None if on_done is None else (lambda r, c=concurrency: on_done(c, r))
        levels.append(await run_level(config, concurrency, slos, callback))
    return levels
