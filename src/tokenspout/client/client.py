"""Sync and async clients that stream deltas over SSE and record time to first token.

with Client("http://127.0.0.1:8000") as client:
    stream = client.stream_chat("Why is the sky blue?", max_tokens=64)
    for delta in stream:
        print(delta, end="", flush=True)
    print(stream.result.ttft_s)
"""

from __future__ import annotations

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
    return {**fields, "stream": True, **params}


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


def _cut(exc: httpx.TransportError) -> StreamError:
    return StreamError(f"the connection failed: {exc or type(exc).__name__}")


def _check_done(result: StreamResult) -> None:
    """A stream that ended without ``[DONE]`` was cut (a proxy's clean close, say): its text
    is not the whole answer, which a caller must not take for one."""
    if result.total_s is None:
        raise StreamError(f"the stream ended before [DONE] after {len(result.text)} characters")


class SyncStream:
    """Iterate for text deltas; ``result`` fills in as the stream goes."""

    def __init__(self, client: httpx.Client, path: str, body: dict[str, Any]):
        self._client, self._path, self._body = client, path, body
        self.result = StreamResult()

    def __iter__(self) -> Iterator[str]:
        self.result = StreamResult()
        try:
            with connect_sse(self._client, "POST", self._path, json=self._body) as source:
                response = source.response
                if response.status_code >= 400:
                    raise _error_from(response, response.read())
                self.result.stream_id = response.headers.get("x-stream-id")
                for event in source.iter_sse():
                    delta = read_event(self.result, event.data)
                    if delta:
                        yield delta
        except httpx.TransportError as exc:
            raise _cut(exc) from exc
        _check_done(self.result)


class AsyncStream:
    """Async twin of ``SyncStream``."""

    def __init__(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]):
        self._client, self._path, self._body = client, path, body
        self.result = StreamResult()

    async def __aiter__(self) -> AsyncIterator[str]:
        self.result = StreamResult()
        try:
            async with aconnect_sse(self._client, "POST", self._path, json=self._body) as source:
                response = source.response
                if response.status_code >= 400:
                    raise _error_from(response, await response.aread())
                self.result.stream_id = response.headers.get("x-stream-id")
                async for event in source.aiter_sse():
                    delta = read_event(self.result, event.data)
                    if delta:
                        yield delta
        except httpx.TransportError as exc:
            raise _cut(exc) from exc
        _check_done(self.result)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Synchronous client. ``params`` are OpenAI request fields (max_tokens, temperature...)
    of a streamed request of one choice. ``base_url``: the server's root, or its ``/v1``
    (``ValueError`` if it is not an http(s) URL)."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
        timeout: float = 600.0,
    ):  # fmt: skip
        root = server_root(base_url)
        self._http = httpx.Client(base_url=root, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def stream_chat(self, prompt: str | list[dict[str, str]], **params: Any) -> SyncStream:
        return SyncStream(self._http, "/v1/chat/completions", _chat_body(prompt, params))

    def stream_completion(self, prompt: str, **params: Any) -> SyncStream:
        return SyncStream(self._http, "/v1/completions", _body(params, prompt=prompt))

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
        timeout: float = 600.0,
    ):  # fmt: skip
        self._http = httpx.AsyncClient(
            base_url=server_root(base_url), headers=_headers(api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def stream_chat(self, prompt: str | list[dict[str, str]], **params: Any) -> AsyncStream:
        return AsyncStream(self._http, "/v1/chat/completions", _chat_body(prompt, params))

    def stream_completion(self, prompt: str, **params: Any) -> AsyncStream:
        return AsyncStream(self._http, "/v1/completions", _body(params, prompt=prompt))

    async def chat(self, prompt: str | list[dict[str, str]], **params: Any) -> StreamResult:
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
