"""The small named exceptions of tokenspout, in one module.

The server maps each to an HTTP status and an OpenAI-shaped error body; the engine raises
them without knowing about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable


def field_path(parts: Iterable[str | int]) -> str:
    """Where a field is in a request body, as an error's ``param`` and message name it:
    ``messages[0].content`` for ``("messages", 0, "content")``."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


class TokenspoutError(Exception):
    """Base class: ``type`` and ``code`` end up in the OpenAI-style error body."""

    status_code: int = 500
    type: str = "server_error"
    code: str | None = None
    #: Seconds to wait before trying again (the response's ``Retry-After``), when known.
    retry_after_s: int | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(TokenspoutError):
    """The request cannot be served as written; the message says what to fix."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PromptTooLongError(InvalidRequestError):
    """The prompt (after the chat template) is longer than the configured limit."""

    code = "context_length_exceeded"


class NothingLeftError(InvalidRequestError):
    """A continuation was asked for an answer that is already whole: its tokens reached
    ``max_tokens`` (or the context), so the uncut answer ended there with ``"length"``.
    Any other refusal of a continuation means the answer cannot be continued."""


class ModelNotFoundError(TokenspoutError):
    """The request names a model this server does not serve."""

    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class StreamNotFoundError(TokenspoutError):
    """No stream with that id is known."""

    status_code = 404
    type = "invalid_request_error"
    code = "stream_not_found"


class StreamGoneError(TokenspoutError):
    """The stream existed but its replay buffer expired or was evicted."""

    status_code = 410
    type = "invalid_request_error"
    code = "stream_gone"

    @classmethod
    def expired(cls, stream_id: str, ttl_s: float) -> StreamGoneError:
        """The stream ended more than ``ttl_s`` (``--resume-ttl-s``) ago."""
        return cls(
            f"stream {stream_id!r} has expired (streams stay replayable for {ttl_s:g} s "
            "after they end); start a new request"
        )


class StreamNotResumableError(TokenspoutError):
    """A second reader asked for a stream that was not opened resumable."""

    status_code = 409
    type = "invalid_request_error"
    code = "stream_not_resumable"


class OverloadedError(TokenspoutError):
    """Admission limits reached; the client should retry after ``retry_after_s``."""

    status_code = 429
    type = "rate_limit_error"
    code = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitError(OverloadedError):
    """An API key is over one of its own limits (streams, requests or tokens per minute)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1, limit: str = "requests"):
        super().__init__(message, retry_after_s=retry_after_s)
        #: Which limit: streams, requests or tokens (a metric label).
        self.limit = limit


class PermissionDeniedError(TokenspoutError):
    """The API key is valid but may not do this (a model it is not allowed)."""

    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class UnsupportedMediaTypeError(InvalidRequestError):
    """A body that is not ``application/json`` (a cross-site form or text/plain post)."""

    status_code = 415
    code = "unsupported_media_type"


class ShuttingDownError(TokenspoutError):
    """The server is draining and accepts no new requests."""

    status_code = 503
    type = "server_error"
    code = "shutting_down"


class StreamMovedError(TokenspoutError):
    """Another replica generates this stream now: this one lost its lease (cut off from
    Redis, or stopped, for longer than it lasts) and the stream was taken over."""

    status_code = 503
    type = "server_error"
    code = "stream_moved"


class EngineError(TokenspoutError):
    """The engine failed while producing tokens for a request."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


class GrammarFailedError(EngineError):
    """The request's grammar could not go on (llguidance gave up on it while generating):
    the request's to change, so a 400, logged without a traceback."""

    status_code = 400
    type = "invalid_request_error"
    code = "grammar_failed"


class EngineUnavailableError(TokenspoutError):
    """The engine's loop has died: nothing more can be generated by this process."""

    status_code = 503
    type = "server_error"
    code = "engine_unavailable"

    @classmethod
    def upstreams_down(cls, failure: str, retry_after_s: int) -> EngineUnavailableError:
        """None of the servers an upstream engine is in front of answers: a retry after
        ``retry_after_s`` (its next health check) may find one back."""
        err = cls(f"{failure}; retry shortly", code="upstream_unavailable")
        err.retry_after_s = retry_after_s
        return err


class InternalError(TokenspoutError):
    """A bug on our side; the message says what failed, without a traceback."""

    status_code = 500
    type = "server_error"
    code = "internal_error"


class ConfigError(TokenspoutError):
    """A server setting, or a combination of them, that cannot work."""

    code = "config_error"


class ModelLoadError(TokenspoutError):
    """The model given at start-up cannot be loaded (wrong format, missing files...)."""

    code = "model_load_error"


class UpstreamError(EngineError):
    """An upstream server could not give (the rest of) an answer. ``status_code`` is the
    one the client gets: the upstream's own for a request it refused (a 4xx; a 401 or 403
    refuses tokenspout's key, not the client's: 502), 503 when no upstream could be
    reached, 504 when one timed out. Messages name upstreams by address only, never with
    their key."""

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 502,
        type: str = "server_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.type = type
        self.retry_after_s = retry_after_s


class RedisUnavailableError(TokenspoutError):
    """An operation that needs the shared Redis (a resume or cancel on another replica, a
    takeover, shared admission) while this replica cannot reach it."""

    status_code = 503
    type = "server_error"
    code = "redis_unavailable"
