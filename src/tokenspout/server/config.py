"""Server settings, one field per ``tokenspout serve`` flag: the one place their defaults
live (the CLI reads them from here)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenspout.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer enforces. Engine settings live with the engine."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Used when a request gives no max_tokens.
    default_max_tokens: int = 512
    #: A request asking for more gets 400.
    max_tokens_limit: int = 4096
    #: Prompt size limit in characters, checked before tokenizing (the token limit is the
    #: engine's context length).
    max_prompt_chars: int = 100_000
    #: Request body limit in bytes.
    max_body_bytes: int = 1 << 20
    flush_tokens: int = 5
    flush_ms: float = 50.0
    heartbeat_interval_s: float = 15.0
    #: Open streams (running or queued) beyond which new requests get 429.
    max_streams: int = 20_000
    #: Requests waiting for an engine slot beyond which new requests get 429.
    max_queued: int = 1024
    #: A send that has not completed for this long closes the connection.
    send_timeout_s: float = 30.0
    drain_timeout_s: float = 10.0
    #: Streams are resumable unless a request says otherwise (stream_options.resumable).
    resumable: bool = False
    #: A resumable stream whose client left keeps generating this long for a reconnect.
    resume_grace_s: float = 30.0
    #: Finished resumable streams stay replayable this long.
    resume_ttl_s: float = 300.0
    #: Replay memory bounds: per stream and in total (the oldest text is evicted first).
    max_stream_buffer_bytes: int = 4 << 20
    max_buffer_bytes: int = 256 << 20
    #: Bearer token required on /v1 routes when set (the key named "default").
    api_key: str | None = None
    #: TOML file of named keys with per-key limits (see ``api_keys``); reloaded on SIGHUP.
    api_keys_file: str | None = None
    #: Bearer token required on /metrics when set.
    metrics_api_key: str | None = None
    #: Origins whose pages may call the API from a browser (CORS); empty means same origin.
    allowed_origins: tuple[str, ...] = ()
    #: Names a server bound to loopback answers to besides IP addresses, localhost and the
    #: machine's name (``trusted_hosts``); "*" for any.
    allowed_hosts: tuple[str, ...] = ()
    #: Extra names a request's ``model`` field may use for the served model.
    model_aliases: tuple[str, ...] = ()
    #: Put each request's prompt in its ``tokenspout.requests`` log line (off: prompts are
    #: user data).
    log_prompts: bool = False
    #: Export one OpenTelemetry trace per request to this OTLP/HTTP endpoint (off if None).
    otlp_traces_endpoint: str | None = None

    #: Share resumable streams, cancels, takeovers and admission with other replicas
    #: through this Redis (``redis://host:port/db``); None: one process, in memory.
    redis_url: str | None = None

    #: Abuse limits (see ``connection_limits`` and ``json_limits``).
    #: A request head (request line and headers) must arrive within this many seconds of
    #: the connection opening or of the previous response.
    header_timeout_s: float = 10.0
    #: A request body must arrive within this many seconds of its head (408 after); a body
    #: answered before it was read, within this many of the answer (a close after).
    body_timeout_s: float = 30.0
    #: Largest request head in bytes (431 beyond it).
    max_head_bytes: int = 64 << 10
    #: Open connections (HTTP and WebSocket) beyond which requests get a fast 503.
    max_connections: int = 4096
    #: Largest WebSocket message in bytes (the socket is closed with 1009 beyond it).
    ws_max_message_bytes: int = 1 << 20
    #: Streams running at once on one WebSocket.
    ws_max_streams: int = 64
    #: Deepest JSON nesting accepted in a request body or WebSocket message.
    max_json_depth: int = 32
    #: ``stop``: how many strings, and how long each may be.
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    #: TLS: served by uvicorn when both are set.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, with a message naming the flags."""
        checks = [
            (1 <= self.default_max_tokens <= self.max_tokens_limit,
             "--default-max-tokens must be between 1 and --max-tokens-limit"),
            (self.flush_tokens >= 1, "--flush-tokens must be >= 1"),
            (self.flush_ms >= 0, "--flush-ms must be >= 0"),
            (self.heartbeat_interval_s > 0, "--heartbeat-interval-s must be > 0"),
            (self.send_timeout_s > 0, "--send-timeout-s must be > 0"),
            (self.drain_timeout_s >= 0, "--drain-timeout-s must be >= 0"),
            (self.max_prompt_chars >= 1, "--max-prompt-chars must be >= 1"),
            (self.max_body_bytes >= 1, "the request body limit must be >= 1 byte"),
            (self.max_streams >= 1, "--max-streams must be >= 1"),
            (self.max_queued >= 0, "--max-queued must be >= 0"),
            (self.resume_grace_s >= 0, "--resume-grace-s must be >= 0"),
            (self.resume_ttl_s >= 0, "--resume-ttl-s must be >= 0"),
            (self.max_stream_buffer_bytes >= 1, "--max-stream-buffer-bytes must be >= 1"),
            (self.max_stream_buffer_bytes <= self.max_buffer_bytes,
             f"--max-stream-buffer-bytes ({self.max_stream_buffer_bytes}) must not be larger "
             f"than --max-buffer-bytes ({self.max_buffer_bytes})"),
            (0 <= self.port < 65536, "--port must be between 0 and 65535"),
            # An empty key would be required and never match: every request 401, for good.
            # (An empty TOKENSPOUT_API_KEY arrives as no key at all.)
            (self.api_key != "",
             "--api-key is empty (an unset shell variable?); leave it out to serve without keys"),
            (self.metrics_api_key != "",
             "--metrics-api-key is empty (an unset shell variable?); leave it out for an open "
             "/metrics"),
            # A bearer token is read without its surrounding spaces: such a key never matched.
            (self.api_key is None or self.api_key == self.api_key.strip(),
             "--api-key begins or ends with whitespace"),
            (self.metrics_api_key is None or self.metrics_api_key == self.metrics_api_key.strip(),
             "--metrics-api-key begins or ends with whitespace"),
            ((self.ssl_certfile is None) == (self.ssl_keyfile is None),
             "--ssl-certfile and --ssl-keyfile go together"),
            (self.header_timeout_s > 0, "--header-timeout-s must be > 0"),
            (self.body_timeout_s > 0, "--body-timeout-s must be > 0"),
            (self.max_head_bytes >= 1, "--max-head-bytes must be >= 1"),
            (self.max_connections >= 1, "--max-connections must be >= 1"),
            (self.ws_max_message_bytes >= 1, "--ws-max-message-bytes must be >= 1"),
            (self.ws_max_streams >= 1, "--ws-max-streams must be >= 1"),
            (self.max_json_depth >= 1, "--max-json-depth must be >= 1"),
            (self.max_stop_strings >= 0, "--max-stop-strings must be >= 0"),
            (self.max_stop_chars >= 1, "--max-stop-chars must be >= 1"),
            (self.otlp_traces_endpoint is None
             or self.otlp_traces_endpoint.startswith(("http://", "https://")),
             f"--otlp-traces-endpoint must be an http(s) URL, not {self.otlp_traces_endpoint!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
