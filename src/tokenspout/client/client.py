"""Sync and async clients that stream deltas over SSE and record time to first token.

with Client("http://127.0.0.1:8000") as client:
    stream = client.stream_chat("Why is the sky blue?", max_tokens=64)
    for delta in stream:
        print(delta, end="", flush=True)
    print(stream.result.ttft_s)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse

from tokenspout.client.chunk_reader import StreamError, StreamResult, read_event

__all__ = ["AsyncClient", "Client", "StreamError", "StreamResult"]


def server_root(url: str) -> str:
    """The server's root URL: a trailing ``/v1`` (the OpenAI SDK's and Ollama's base URL) is
    dropped. Raises ``ValueError`` for a URL that httpx cannot use."""
    url = url.rstrip("/")
    url = url[: -len("/v1")] if url.endswith("/v1") else url
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    return url


def _body(params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A streamed request of ``fields`` and the caller's OpenAI ``params``: one choice (a
    stream's text is one answer; choices would interleave)."""
    if params.get("n", 1) != 1 or params.get("stream", True) is not True:
        raise ValueError("the client streams one choice: leave out n and stream")
    body = {**fields, "stream": True, **params}
    for name, value in body.items():
        _check_text(value, name)
    return body


def _check_text(value: Any, name: str) -> None:
    """Refuse text that UTF-8 cannot carry (a lone surrogate, left by a lenient decode),
    naming where it is: httpx raised UnicodeEncodeError while sending, naming nothing."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name} cannot be sent as UTF-8: {exc.reason} at character {exc.start}"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(item, f"{name}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_text(item, f"{name}[{i}]")


def _chat_body(prompt: str | list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return _body(params, messages=messages)


def _cancelled(response: httpx.Response) -> None:
    """A cancel's answer: nothing, or ``StreamError`` as a refused stream gets it."""
    if response.status_code >= 400:
        raise _error_from(response, response.content)


def _error_from(response: httpx.Response, body: bytes) -> StreamError:
    try:
        message = response.json()["error"]["message"]
    except Exception:
        message = body.decode("utf-8", "replace")[:500]
    return StreamError(message, status_code=response.status_code, body=body)


def _is_event_stream(response: httpx.Response) -> bool:
    """A 2xx answer of events (httpx-sse's own test of the type): anything else is no stream
    (httpx-sse raised its SSEError, a TransportError, reported as a failed connection)."""
    content_type = response.headers.get("content-type", "")
    return response.is_success and "text/event-stream" in content_type


def _unexpected(response: httpx.Response, body: bytes) -> StreamError:
    """An answer that is neither an error nor an event stream: a redirect (not followed), an
    HTML page of a proxy... Reported as it is, and not resumed: a resume would get the same."""
    location = response.headers.get("location")
    what = (
        f"a redirect to {location} (not followed)"
        if response.is_redirect and location
        else f"content type {response.headers.get('content-type') or 'none'}"
    )
    return StreamError(
        f"unexpected answer, not an event stream: HTTP {response.status_code}, {what}",
        status_code=response.status_code, body=body,
    )  # fmt: skip


def _cut(exc: httpx.TransportError) -> StreamError:
    try:
        # Where it went: a server on another port is the usual reason for a refusal.
        to = f" to {exc.request.url.copy_with(query=None)}"
    except RuntimeError:  # an exception raised without its request
        to = ""
    err = StreamError(f"the connection{to} failed: {str(exc) or type(exc).__name__}")
    err.__cause__ = exc
    return err


def _cut_short(result: StreamResult) -> StreamError | None:
    """A stream that ended without ``[DONE]`` was cut (a proxy's clean close, say): its text
    is not the whole answer, which a caller must not take for one."""
    if result.total_s is not None:
        return None
    return StreamError(f"the stream ended before [DONE] after {len(result.text)} characters")


#: Answers to a resume that a balancer gives while a replica dies or is busy: tried again.
_PASSING = frozenset({429, 502, 503, 504})


class _Attempts:
    """The requests of one stream: the first, then, after a cut, resumes (``GET
    /v1/streams/{id}``, through any replica) from the last event id it saw, or from the
    start when the cut came before any event, while tries are left. A stream that is not
    resumable (or no longer held) refuses the resume, and the cut is reported with why; one
    the request itself opened not resumable (``stream_options.resumable`` false) is not
    tried."""

    def __init__(self, path: str, body: dict[str, Any], tries: int, result: StreamResult):
        self._path, self._body, self._tries = path, body, tries
        self.result = result
        result._started = time.perf_counter()  # the stream's clock starts with its request
        self.last_id: str | None = None
        #: What cut the stream last; None until then (the first request is not a resume).
        self._cut: StreamError | None = None
        #: The last request's answer was open: a failure now is a new cut, not a failed resume.
        self._open = False
        self._tried = 0
        #: Since the last cut: resumes that failed, and the last one's HTTP status.
        self._failed = 0
        self._status: int | None = None
        options = body.get("stream_options")
        self._resumable = not (isinstance(options, dict) and options.get("resumable") is False)

    def request(self) -> tuple[str, str, dict[str, Any]]:
        """Method, path and httpx arguments of the next request."""
        if self._cut is None:
            return "POST", self._path, {"json": self._body}
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        return "GET", f"/v1/streams/{self.result.stream_id}", {"headers": headers}

    def refused(self, err: StreamError) -> StreamError:
        """An answer of 400 or more: raise its error, unless it is a resume that a balancer
        turned away for now, returned as the cut to try again after."""
        if self._cut is None:
            raise err
        self._status = err.status_code
        if err.status_code in _PASSING:
            return err
        # Not the request's own refusal: the cut is what happened, the refusal says why
        # there is no more (not resumable, expired).
        raise StreamError(
            f"the stream was cut: {self._cut}; it could not be resumed: {err}",
            status_code=err.status_code, body=err.body,
        ) from err  # fmt: skip

    def opened(self, response: httpx.Response) -> None:
        self.result.stream_id = self.result.stream_id or response.headers.get("x-stream-id")
        self._open = True
        if self._cut is not None:
            self.result.resumes += 1

    def read(self, event_id: str, data: str) -> str:
        """One event's text delta; its id (httpx-sse keeps the last one) is where a resume
        starts."""
        delta = read_event(self.result, data)
        if event_id:
            self.last_id = event_id
        return delta

    def cut(self, err: StreamError) -> float:
        """Raise ``err`` unless the stream can go on; else the seconds to wait first: none
        for the first try (a dropped connection), then a short backoff. ``err`` is a new
        cut of an open stream, or the failure of a resume (then the cut stays what is
        reported first)."""
        if self._open or self._cut is None:
            self._cut, self._failed, self._status = err, 0, None
        else:
            self._failed += 1
        self._open = False
        resumable_from = self.last_id is not None or self.result.events == 0
        if not self._resumable or self.result.stream_id is None or not resumable_from:
            raise err
        if self._tried >= self._tries:
            if self._tried == 0:
                raise StreamError(f"{err} (not resumed: resumes=0)") from err
            raise StreamError(
                f"the stream was cut: {self._cut}; resuming it failed ({self._failed} tries), "
                f"the last: {_resume_failure(err)}",
                status_code=self._status, body=err.body,
            ) from err  # fmt: skip
        self._tried += 1
        return 0.0 if self._tried == 1 else min(0.25 * 2 ** (self._tried - 2), 4.0)


def _resume_failure(err: StreamError) -> str:
    """Why a resume failed, without the URL of the resume (one the caller never asked for:
    the cut before names the request's)."""
    if isinstance(err.__cause__, httpx.TransportError):
        return str(err.__cause__) or type(err.__cause__).__name__
    return f"HTTP {err.status_code}: {err}" if err.status_code is not None else str(err)


class SyncStream:
    """Iterate once for text deltas; ``result`` fills in as the stream goes. A resumable
    stream that is cut goes on from where it was (``resumes`` tries at most)."""

    def __init__(self, client: httpx.Client, path: str, body: dict[str, Any], resumes: int):
        self._client, self._path, self._body, self._resumes = client, path, body, resumes
        self.result = StreamResult()
        self._iterated = False

    def __iter__(self) -> Iterator[str]:
        _once(self)
        # The stream's own result, filled in place: one taken before iterating fills too.
        attempts = _Attempts(self._path, self._body, self._resumes, self.result)
        while True:
            method, path, kwargs = attempts.request()
            try:
                with connect_sse(self._client, method, path, **kwargs) as source:
                    response = source.response
                    if response.status_code >= 400:
                        cut = attempts.refused(_error_from(response, response.read()))
                    elif not _is_event_stream(response):
                        raise _unexpected(response, response.read())
                    else:
                        attempts.opened(response)
                        for event in source.iter_sse():
                            delta = attempts.read(event.id, event.data)
                            if delta:
                                yield delta
                        short = _cut_short(self.result)
                        if short is None:
                            return
                        cut = short
            except httpx.TransportError as exc:
                cut = _cut(exc)
            _check_open(self._client, cut)
            time.sleep(attempts.cut(cut))


class AsyncStream:
    """Async twin of ``SyncStream``."""

    def __init__(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], resumes: int):
        self._client, self._path, self._body, self._resumes = client, path, body, resumes
        self.result = StreamResult()
        self._iterated = False

    async def __aiter__(self) -> AsyncIterator[str]:
        _once(self)
        # The stream's own result, filled in place: one taken before iterating fills too.
        attempts = _Attempts(self._path, self._body, self._resumes, self.result)
        while True:
            method, path, kwargs = attempts.request()
            try:
                async with aconnect_sse(self._client, method, path, **kwargs) as source:
                    response = source.response
                    if response.status_code >= 400:
                        cut = attempts.refused(_error_from(response, await response.aread()))
                    elif not _is_event_stream(response):
                        raise _unexpected(response, await response.aread())
                    else:
                        attempts.opened(response)
                        async for event in source.aiter_sse():
                            delta = attempts.read(event.id, event.data)
                            if delta:
                                yield delta
                        short = _cut_short(self.result)
                        if short is None:
                            return
                        cut = short
            except httpx.TransportError as exc:
                cut = _cut(exc)
            _check_open(self._client, cut)
            await asyncio.sleep(attempts.cut(cut))


def _check_open(client: httpx.Client | httpx.AsyncClient, cut: StreamError) -> None:
    """A stream whose client was closed under it (``close()``, the end of its ``with``) is
    over: its cut is the close, and a resume through the closed client could only fail
    (httpx's RuntimeError)."""
    if client.is_closed:
        raise StreamError("the client was closed during the stream") from cut


def _once(stream: SyncStream | AsyncStream) -> None:
    """A stream is one request: iterating it again would generate another answer."""
    if stream._iterated:
        raise RuntimeError("a stream is iterated once; call stream_chat again for a new answer")
    stream._iterated = True


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Synchronous client. ``params`` are OpenAI request fields (max_tokens, temperature...)
    of a streamed request of one choice. ``base_url``: the server's root, or its ``/v1``
    (``ValueError`` if it is not an http(s) URL). A resumable stream (``stream_options=
    {"resumable": True}``, or a server run with ``--resumable``) whose connection is cut is
    resumed from its last event, ``resumes`` times at most: through a balancer in front of
    replicas sharing Redis, an answer survives the death of the replica that served it."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
        timeout: float = 600.0, resumes: int = 3,
    ):  # fmt: skip
        root = server_root(base_url)
        self._http = httpx.Client(base_url=root, headers=_headers(api_key), timeout=timeout)
        self._resumes = resumes

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; a stream still being read ends with ``StreamError``."""
        self._http.close()

    def stream_chat(self, prompt: str | list[dict[str, str]], **params: Any) -> SyncStream:
        """A chat answer to ``prompt`` (a user message, or a list of messages) to iterate
        for its text deltas; the request is sent when iteration starts. ``ValueError`` now
        for ``n``, ``stream`` or text UTF-8 cannot carry; ``StreamError`` while iterating if
        the server refuses or the stream is cut for good."""
        return SyncStream(
            self._http, "/v1/chat/completions", _chat_body(prompt, params), self._resumes
        )

    def stream_completion(self, prompt: str, **params: Any) -> SyncStream:
        """A completion of ``prompt`` (``/v1/completions``) to iterate for its text deltas;
        otherwise as ``stream_chat``."""
        return SyncStream(
            self._http, "/v1/completions", _body(params, prompt=prompt), self._resumes
        )

    def chat(self, prompt: str | list[dict[str, str]], **params: Any) -> StreamResult:
        """Stream a chat answer to the end and return it with its timing."""
        stream = self.stream_chat(prompt, **params)
        for _ in stream:
            pass
        return stream.result

    def cancel(self, stream_id: str) -> None:
        """Cancel a stream by id; ``StreamError`` if the server refuses or cannot be reached."""
        try:
            _cancelled(self._http.post(f"/v1/streams/{stream_id}/cancel"))
        except httpx.TransportError as exc:
            raise _cut(exc) from exc


class AsyncClient:
    """Asynchronous client; same methods as ``Client``, awaitable."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
        timeout: float = 600.0, resumes: int = 3,
    ):  # fmt: skip
        self._http = httpx.AsyncClient(
            base_url=server_root(base_url), headers=_headers(api_key), timeout=timeout
        )
        self._resumes = resumes

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; a stream still being read ends with ``StreamError``."""
        await self._http.aclose()

    def stream_chat(self, prompt: str | list[dict[str, str]], **params: Any) -> AsyncStream:
        """A chat answer to ``prompt`` to iterate with ``async for``; as
        ``Client.stream_chat``."""
        return AsyncStream(
            self._http, "/v1/chat/completions", _chat_body(prompt, params), self._resumes
        )

    def stream_completion(self, prompt: str, **params: Any) -> AsyncStream:
        """A completion of ``prompt`` to iterate with ``async for``; as
        ``Client.stream_completion``."""
        return AsyncStream(
            self._http, "/v1/completions", _body(params, prompt=prompt), self._resumes
        )

    async def chat(self, prompt: str | list[dict[str, str]], **params: Any) -> StreamResult:
        """Stream a chat answer to the end and return it with its timing."""
        stream = self.stream_chat(prompt, **params)
        async for _ in stream:
            pass
        return stream.result

    async def cancel(self, stream_id: str) -> None:
        """Cancel a stream by id; ``StreamError`` if the server refuses or cannot be reached."""
        try:
            _cancelled(await self._http.post(f"/v1/streams/{stream_id}/cancel"))
        except httpx.TransportError as exc:
            raise _cut(exc) from exc
