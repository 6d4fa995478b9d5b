"""How the upstream engine reaches its servers and when it gives up on one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tokenspout.errors import ConfigError
from tokenspout.url_address import address

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamOptions:
    """``tokenspout serve --engine upstream`` settings (see the flags' help)."""

    #: OpenAI-compatible base URLs, e.g. ``http://host:8000/v1``.
    urls: tuple[str, ...]
    #: Sent to every upstream as ``Authorization: Bearer``; never logged or shown.
    api_key: str | None = field(default=None, repr=False)
    #: Requests in flight per upstream; more wait in tokenspout's queue.
    max_concurrency: int = 64
    #: Seconds between active health checks (``GET /models``) of each upstream.
    health_interval_s: float = 5.0
    #: Consecutive connect errors, 5xx, 401 or 403 that take an upstream out until it is
    #: healthy.
    eject_after: int = 3
    #: Tries on other upstreams after a failure before the first token.
    retries: int = 2
    #: No first byte of the answer within this long counts as a failure (then retried).
    first_token_timeout_s: float = 60.0
    #: No chunk for this long mid-stream counts as a cut (then continued elsewhere).
    stall_timeout_s: float = 30.0
    #: First retry's backoff; doubled per retry, with up to as much again of jitter.
    backoff_s: float = 0.05
    #: Longest ``Retry-After`` of a 429 that is waited for.
    max_retry_after_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("--engine upstream needs at least one --upstream URL")
        seen: set[str] = set()
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                shown = address(url) if "@" in url else url  # user info stays out of logs
                raise ConfigError(
                    f"--upstream must be an http(s) OpenAI base URL such as "
                    f"http://host:8000/v1, not {shown!r}"
                )
            if parts.path in ("", "/"):
                # Not refused (a proxy may serve the API at its root), but llama-server
                # answers /chat/completions there too and /completions in its own shape:
                # chat would work and completions fail as malformed chunks.
                logger.warning(
                    "--upstream %s has no path: OpenAI-compatible servers (vLLM, llama.cpp, "
                    "TGI) serve the API under /v1; did you mean %s/v1?",
                    address(url),
                    address(url),
                )
            # One server given twice would be balanced as two, and its metrics' samples
            # would repeat (an exposition scrapers refuse).
            if address(url) in seen:
                raise ConfigError(f"--upstream {address(url)} is given twice")
            seen.add(address(url))
        if self.max_concurrency < 1 or self.eject_after < 1 or self.retries < 0:
            raise ConfigError("--upstream-max-concurrency must be >= 1 and --upstream-retries >= 0")
        timeouts = (self.health_interval_s, self.first_token_timeout_s, self.stall_timeout_s)
        if not all(t > 0 for t in timeouts):  # NaN too
            raise ConfigError("upstream intervals and timeouts must be > 0")
