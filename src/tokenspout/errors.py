"""The small named exceptions of tokenspout, in one module.

The server maps each to an HTTP status and an OpenAI-shaped error body; the engine raises
them without knowing about HTTP.
"""

from __future__ import annotations


class TokenspoutError(Exception):
    """Base class: ``type`` and ``code`` end up in the OpenAI-style error body."""

    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

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


class EngineError(TokenspoutError):
    """The engine failed while producing tokens for a request."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


class ModelLoadError(TokenspoutError):
    """The model given at start-up cannot be loaded (wrong format, missing files...)."""

    code = "model_load_error"
