"""One upstream server: its pooled HTTP client, the models it serves (with their context
length where its ``/models`` says it), and its health.

Health is active and passive: ``check`` asks ``GET /models`` (every
``--upstream-health-interval-s``, from the pool), and ``eject_after`` consecutive connect
errors, 5xx answers or refusals of tokenspout's key (401, 403) take the upstream out until a
check finds it healthy again.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from tokenspout.engine.interface import SYNTHETIC_OWNER
from tokenspout.engine.upstream_body import TokenCounts
from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_transport import relay_transport
from tokenspout.url_address import address

logger = logging.getLogger(__name__)

#: Connecting is quick or the upstream is down; the answer's own pace is bounded by the
#: relay's first-token and stall timeouts, not by httpx's read timeout.
_CONNECT_TIMEOUT_S = 5.0
_CHECK_TIMEOUT_S = 5.0
_KEEPALIVE_S = 2.0


class UpstreamServer:
    """An upstream at ``url`` (its OpenAI base, ``.../v1``)."""

    def __init__(self, url: str, options: UpstreamOptions):
        self.url = url.rstrip("/")
        #: How it is named in logs, metrics and messages: no credentials.
        self.address = address(url)
        self.max_concurrency = options.max_concurrency
        self._eject_after = options.eject_after
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        # One pooled client per upstream: keep-alive for every request it may run at once,
        # plus one connection for the health checks.
        limits = httpx.Limits(
            max_connections=options.max_concurrency + 1,
            max_keepalive_connections=options.max_concurrency + 1,
            # Servers close idle connections after about 5 s (uvicorn, llama-server): a
            # POST sent on one just closed fails before any answer, so idle ones are
            # dropped here first.
            keepalive_expiry=_KEEPALIVE_S,
        )
        # Plain HTTP goes through our transport (the relay's CPU per token), the rest
        # through httpx's own.
        self._transport = relay_transport(self.url, limits)
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(_CONNECT_TIMEOUT_S, read=None, write=_CONNECT_TIMEOUT_S),
            transport=self._transport,
        )
        self._timeouts = self.client.timeout.as_dict()
        #: Per path: the request line and the headers every request to it carries.
        self._heads: dict[str, bytes] = {}
        #: Model ids it serves (its ``/models``), as of the last successful check.
        self.models: frozenset[str] = frozenset()
        #: Each model's context length in tokens, for the models whose entry gives one.
        self.context_lengths: dict[str, int] = {}
        #: How its chunks say how many tokens they hold (``token_counts``), as of the last
        #: successful check; None: they do not, and a chunk counts as one token.
        self.token_counts: TokenCounts | None = None
        #: It is a tokenspout serving its synthetic engine (its ``/models`` says so): what
        #: it streams is to be labelled synthetic here too.
        self.synthetic = False
        self.healthy = False
        #: Requests it is answering now (the balancer's least-outstanding count).
        self.outstanding = 0
        #: A chunk came from it since the last health check (set by the relays).
        self.streaming = False
        self._failures = 0

    @property
    def has_room(self) -> bool:
        return self.outstanding < self.max_concurrency

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST ``body`` to ``path`` (under its base URL) with ``headers`` besides the
        client's own; the answer's body is left to stream (close the response)."""
        if self._transport is None:
            request = self.client.build_request("POST", path, content=body, headers=headers)
            return await self.client.send(request, stream=True)
        head = self._heads.get(path) or self._head(path)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if extra.count("\n") != len(headers) or extra.count("\r") != len(headers):
            raise ValueError(f"a header holds a line break: {headers!r}")  # no smuggling
        wire = b"%s%sContent-Length: %d\r\n\r\n%s" % (head, extra.encode(), len(body), body)
        return await self._transport.exchange(self.client.base_url, wire, self._timeouts)

    def _head(self, path: str) -> bytes:
        """What httpx would send before the request's own headers: the request line, Host
        and the client's headers (User-Agent, Accept..., the API key)."""
        url = self.client.build_request("POST", path).url
        lines = [b"POST %s HTTP/1.1" % url.raw_path, b"Host: %s" % url.netloc]
        lines += [name + b": " + value for name, value in self.client.headers.raw]
        head = self._heads[path] = b"\r\n".join(lines) + b"\r\n"
        return head

    def serves(self, model: str) -> bool:
        return model in self.models

    async def check(self) -> None:
        """Ask its ``/models``: healthy, with that list, if it answers. A failed check counts
        as a failure: ``eject_after`` in a row take it out (one slow answer from a busy
        upstream does not)."""
        try:
            r = await self.client.get("/models", timeout=_CHECK_TIMEOUT_S)
            r.raise_for_status()
            entries = r.json()["data"]
            models = frozenset(m["id"] for m in entries)
            lengths = {m["id"]: n for m in entries if (n := context_length(m)) is not None}
            counts = token_counts(entries)
            synthetic = bool(entries) and all(m.get("owned_by") == SYNTHETIC_OWNER for m in entries)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            if self.streaming:
                # It answered requests since the last check: busy, not down.
                self.streaming = False
                return
            self.failed(f"health check: {_why(exc)}")
            return
        self.streaming = False
        if not self.healthy:
            logger.info("upstream %s is healthy; serves %s", self.address, ", ".join(models))
        self.models = models
        self.context_lengths = lengths
        self.token_counts = counts
        self.synthetic = synthetic
        self.healthy = True
        self._failures = 0

    def succeeded(self) -> None:
        """It answered a request (any status below 500 but 401, 403 and 429)."""
        self._failures = 0

    def failed(self, why: str, *, may_eject: bool = True) -> None:
        """A connect error, a 5xx, a 401 or 403, or a failed health check; ``eject_after``
        of them in a row take it out (when ``may_eject``)."""
        self._failures += 1
        if may_eject and self.healthy and self._failures >= self._eject_after:
            logger.warning(
                "upstream %s ejected after %d failures in a row (last: %s)",
                self.address,
                self._failures,
                why,
            )
            self.healthy = False

    async def close(self) -> None:
        await self.client.aclose()


def token_counts(entries: list[dict[str, Any]]) -> TokenCounts | None:
    """How the server whose ``/models`` lists ``entries`` can be asked to count the tokens
    of each streamed chunk: one chunk may hold several (a coalescing server such as
    tokenspout; llama.cpp sends the tokens of a UTF-8 character together), and a
    continuation's ``max_tokens`` must take off what was generated, not what was sent.
    vLLM and tokenspout put the usage so far in every chunk
    (``stream_options.continuous_usage_stats``), llama.cpp its ``timings.predicted_n``
    (``timings_per_token``). Others are not asked: a field a hosted API does not know can
    be refused."""
    owners = {str(m.get("owned_by", "")) for m in entries}
    if owners and all(o.startswith("tokenspout") for o in owners):
        return "tokenspout"
    if owners and all(o == "vllm" or o.startswith("tokenspout") for o in owners):
        return "usage"
    if owners == {"llamacpp"}:
        return "timings"
    return None


def context_length(entry: dict[str, Any]) -> int | None:
    """The context length (prompt + output tokens) an upstream's ``/models`` entry gives,
    or None: vLLM, SGLang and tokenspout say ``max_model_len``; llama.cpp's
    ``llama-server`` says ``meta.n_ctx`` (what one of its slots holds: ``--ctx-size``
    over ``--parallel``) and ``meta.n_ctx_train`` (the model's own); hosted APIs such as
    OpenRouter say ``context_length``."""
    meta = entry.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    served = [v for v in (meta.get("n_ctx"), meta.get("n_ctx_train")) if _length(v)]
    for value in (entry.get("max_model_len"), entry.get("context_length")):
        if _length(value):
            return value
    # The smaller: a prompt longer than a slot is refused whatever the model could take.
    return min(served) if served else None


def _length(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _why(exc: Exception) -> str:
    """A one-line reason that names no URL with credentials (httpx errors carry only the
    request's URL, which is the upstream's base without its key)."""
    return f"{type(exc).__name__}: {exc}"[:200]
