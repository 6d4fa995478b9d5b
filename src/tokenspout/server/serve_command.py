"""``tokenspout serve``: flags → ``ServerConfig`` and an engine → the app under uvicorn.

Every server setting's default is read from ``ServerConfig`` (one place). A setting, or a
combination of them, that cannot work is one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import fields
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from tokenspout.engine.weight_formats import FORMATS
from tokenspout.errors import ConfigError, ModelLoadError, TokenspoutError
from tokenspout.server.api_keys import KeyStore
from tokenspout.server.config import ServerConfig
from tokenspout.server.tls_handshake import tls_context
from tokenspout.server.trusted_hosts import trusted_names

if TYPE_CHECKING:
    from tokenspout.engine.interface import Engine

err_console = Console(stderr=True)
_D = ServerConfig()


class EngineName(StrEnum):
    embedded = "embedded"
    synthetic = "synthetic"
    upstream = "upstream"


# Every format the engine loads (a hand-kept list here had lost q4_1 and fp16).
WeightFormat = StrEnum("WeightFormat", {fmt: fmt for fmt in FORMATS})

#: The engine flags each engine reads, flag (parameter) → constructor argument. A flag given
#: for an engine that does not read it is refused rather than silently ignored.
_ENGINE_FLAGS: dict[EngineName, dict[str, str]] = {
    EngineName.embedded: {"model": "model", "max_num_seqs": "max_num_seqs",
                          "max_model_len": "max_model_len", "threads": "num_threads",
                          "max_prefill_tokens": "max_prefill_tokens", "weights": "weights",
                          "prefix_cache": "prefix_cache"},
    EngineName.synthetic: {"synthetic_ttft_ms": "ttft_ms", "synthetic_itl_ms": "itl_ms",
                           "max_num_seqs": "max_num_seqs", "max_model_len": "max_model_len"},
    EngineName.upstream: {"upstream": "urls", "upstream_api_key": "api_key",
                          "upstream_max_concurrency": "max_concurrency",
                          "upstream_health_interval_s": "health_interval_s",
                          "upstream_retries": "retries",
                          "upstream_first_token_timeout_s": "first_token_timeout_s",
                          "upstream_stall_timeout_s": "stall_timeout_s"},
}  # fmt: skip


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind.")] = _D.host,
    port: Annotated[int, typer.Option(help="Port to bind.")] = _D.port,
    engine: Annotated[
        EngineName,
        typer.Option(
            help="embedded: the real model on the CPU; synthetic: load tests; upstream: in "
            "front of OpenAI-compatible servers (--upstream)."
        ),
    ] = EngineName.embedded,
    model: Annotated[
        str | None,
        typer.Option(help="GGUF file or Hugging Face model directory (default: SmolLM2-135M)."),
    ] = None,
    served_model_name: Annotated[
        list[str] | None, typer.Option(help="Extra names requests may use for the model.")
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(min=1, help="Running batch size (embedded: 32).")
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option(min=1, help="Context length, prompt + output (embedded: 2048).")
    ] = None,
    max_prefill_tokens: Annotated[
        int | None, typer.Option(help="Prompt tokens per step (256).")
    ] = None,
    weights: Annotated[
        WeightFormat | None,
        typer.Option(
            help="Weight format (by CPU: q4_1 where the block kernels build, else int8 with "
            "AVX-512 BF16, else fp16)."
        ),
    ] = None,
    prefix_cache: Annotated[
        bool | None, typer.Option(help="Reuse KV of shared prompt prefixes (on).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Model threads, fixed, at most the usable cores (default: usable cores, one "
            "while others compete).",
        ),
    ] = None,
    synthetic_ttft_ms: Annotated[
        float | None, typer.Option(help="Synthetic engine TTFT in ms (0).")
    ] = None,
    synthetic_itl_ms: Annotated[
        float | None,
        typer.Option(help="Synthetic decode step: every running request gets a token, ms (0)."),
    ] = None,
    upstream: Annotated[
        list[str] | None,
        typer.Option(
            help="--engine upstream: an OpenAI base URL (http://host:8000/v1); repeatable."
        ),
    ] = None,
    upstream_api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TOKENSPOUT_UPSTREAM_API_KEY",
            help="Bearer token sent to the upstreams (never logged or shown).",
            show_default=False,
        ),
    ] = None,
    upstream_max_concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight per upstream; more wait here (64).")
    ] = None,
    upstream_health_interval_s: Annotated[
        float | None, typer.Option(help="Seconds between health checks of each upstream (5).")
    ] = None,
    upstream_retries: Annotated[
        int | None,
        typer.Option(help="Tries on other upstreams after a failure, before or mid-answer (2)."),
    ] = None,
    upstream_first_token_timeout_s: Annotated[
        float | None,
        typer.Option(
            help="No first chunk with output (a chat's role alone is none) within this: try "
            "another upstream (60)."
        ),
    ] = None,
    upstream_stall_timeout_s: Annotated[
        float | None,
        typer.Option(help="No chunk for this long mid-answer: continue on another upstream (30)."),
    ] = None,
    flush_tokens: Annotated[
        int, typer.Option(help="Coalesce up to N tokens per event.")
    ] = _D.flush_tokens,
    flush_ms: Annotated[float, typer.Option(help="...or send after this many ms.")] = _D.flush_ms,
    heartbeat_interval_s: Annotated[
        float,
        typer.Option(
            help="Seconds between heartbeats while idle (SSE ': ping', empty NDJSON line)."
        ),
    ] = _D.heartbeat_interval_s,
    default_max_tokens: Annotated[
        int, typer.Option(help="max_tokens when omitted.")
    ] = _D.default_max_tokens,
    max_tokens_limit: Annotated[
        int, typer.Option(help="Largest max_tokens allowed.")
    ] = _D.max_tokens_limit,
    max_prompt_chars: Annotated[
        int, typer.Option(help="Largest prompt in characters.")
    ] = _D.max_prompt_chars,
    max_streams: Annotated[int, typer.Option(help="Open streams before 429.")] = _D.max_streams,
    max_queued: Annotated[int, typer.Option(help="Queued requests before 429.")] = _D.max_queued,
    send_timeout_s: Annotated[
        float, typer.Option(help="Close a client that stops reading.")
    ] = _D.send_timeout_s,
    drain_timeout_s: Annotated[
        float, typer.Option(help="Grace for streams on SIGTERM.")
    ] = _D.drain_timeout_s,
    resumable: Annotated[
        bool, typer.Option(help="Streams resumable by default (stream_options.resumable).")
    ] = _D.resumable,
    resume_grace_s: Annotated[
        float, typer.Option(help="A resumable stream whose client left waits this long.")
    ] = _D.resume_grace_s,
    resume_ttl_s: Annotated[
        float, typer.Option(help="Finished resumable streams stay replayable this long.")
    ] = _D.resume_ttl_s,
    max_stream_buffer_bytes: Annotated[
        int,
        typer.Option(help="Text held per stream; past it the engine waits for slow readers."),
    ] = _D.max_stream_buffer_bytes,
    max_buffer_bytes: Annotated[
        int, typer.Option(help="Text held for all streams (replay text evicted first).")
    ] = _D.max_buffer_bytes,
    api_key: Annotated[
        str | None, typer.Option(envvar="TOKENSPOUT_API_KEY", help="Require this bearer token.")
    ] = None,
    api_keys_file: Annotated[
        str | None,
        typer.Option(help="TOML file of named keys with per-key limits; reloaded on SIGHUP."),
    ] = None,
    metrics_api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TOKENSPOUT_METRICS_API_KEY",
            help="Require this token on /metrics and /dashboard/data.",
        ),
    ] = None,
    header_timeout_s: Annotated[
        float,
        typer.Option(
            help="A request head must arrive within this (slowloris); so must a TLS handshake."
        ),
    ] = _D.header_timeout_s,
    body_timeout_s: Annotated[
        float,
        typer.Option(
            help="A request body must arrive within this of its head (408); one answered "
            "before it was read, within this of the answer (else a close)."
        ),
    ] = _D.body_timeout_s,
    max_head_bytes: Annotated[
        int, typer.Option(help="Largest request head (431).")
    ] = _D.max_head_bytes,
    max_connections: Annotated[
        int,
        typer.Option(
            help="Open connections before a fast 503 (over HTTPS: a close as the connection "
            "opens; those in their TLS handshake count)."
        ),
    ] = _D.max_connections,
    ws_max_message_bytes: Annotated[
        int, typer.Option(help="Largest WebSocket message.")
    ] = _D.ws_max_message_bytes,
    ws_max_streams: Annotated[
        int, typer.Option(help="Streams at once per WebSocket.")
    ] = _D.ws_max_streams,
    max_json_depth: Annotated[
        int, typer.Option(help="Deepest JSON nesting in a request.")
    ] = _D.max_json_depth,
    max_stop_strings: Annotated[
        int, typer.Option(help="Most strings in `stop`.")
    ] = _D.max_stop_strings,
    max_stop_chars: Annotated[
        int, typer.Option(help="Longest string in `stop`.")
    ] = _D.max_stop_chars,
    ssl_certfile: Annotated[
        str | None, typer.Option(help="Serve HTTPS/WSS: certificate (PEM).")
    ] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="Serve HTTPS/WSS: private key.")] = None,
    allowed_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allow browser pages from this origin (CORS); repeatable, * for any."),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Bound to loopback, also answer to this Host name (a proxy's; beside IP "
            "addresses, localhost, this machine's name); repeatable, * for any."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_prompts: Annotated[
        bool,
        typer.Option(help="Include prompts in the per-request JSON log lines (and GET URLs)."),
    ] = _D.log_prompts,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="TOKENSPOUT_REDIS_URL",
            help="Share streams with other replicas through Redis (redis://host:port/db).",
        ),
    ] = _D.redis_url,
    otlp_traces_endpoint: Annotated[
        str | None,
        typer.Option(help="Export a trace per request over OTLP/HTTP, e.g. http://host:4318."),
    ] = _D.otlp_traces_endpoint,
) -> None:
    """Serve a model over HTTP (SSE, NDJSON, WebSocket) with an OpenAI-compatible API."""
    # The flags named after ServerConfig's fields go to it as they are.
    settings = {f.name for f in fields(ServerConfig)}
    given = {k: v for k, v in locals().items() if k in settings}
    try:
        _configure_logging(log_level)
        config = ServerConfig(
            **given,
            model_aliases=tuple(served_model_name or ()),
            allowed_origins=tuple(allowed_origin or ()),
            allowed_hosts=tuple(allowed_host or ()),
        )
        if config.api_keys_file is not None:
            # Checked before the model loads, whole (names and secrets used twice, with
            # --api-key's too): a broken keys file is one line and exit 2.
            KeyStore(config.api_key, config.api_keys_file)
        trusted_names(config.allowed_hosts, config.allowed_origins)  # each a host name
        if config.ssl_certfile is not None and config.ssl_keyfile is not None:
            _check_tls(config.ssl_certfile, config.ssl_keyfile)
        if config.redis_url is not None:
            # Also before the model loads: an unreachable Redis is one line and exit 2.
            from tokenspout.cluster.redis_link import check_reachable

            check_reachable(config.redis_url)
        # A key in the environment is there for whichever engine runs; only a flag on the
        # command line is refused when the engine does not read it.
        from_env = {k for flags in _ENGINE_FLAGS.values() for k in flags if _from_env(ctx, k)}
        built = _engine(
            engine,
            from_env,
            model=model,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            max_prefill_tokens=max_prefill_tokens,
            weights=weights,
            prefix_cache=prefix_cache,
            threads=threads,
            synthetic_ttft_ms=synthetic_ttft_ms,
            synthetic_itl_ms=synthetic_itl_ms,
            upstream=tuple(upstream) if upstream else None,
            upstream_api_key=upstream_api_key,
            upstream_max_concurrency=upstream_max_concurrency,
            upstream_health_interval_s=upstream_health_interval_s,
            upstream_retries=upstream_retries,
            upstream_first_token_timeout_s=upstream_first_token_timeout_s,
            upstream_stall_timeout_s=upstream_stall_timeout_s,
        )
    except (ConfigError, ModelLoadError, ValueError) as exc:
        _refuse(exc)
    from tokenspout.server.app import create_app
    from tokenspout.server.serve import serve as run

    application = create_app(built, config)
    try:
        run(application, application.state.tokenspout, host=host, port=port, log_level=log_level)
    except ModelLoadError as exc:  # the engine's start: the weights, the KV cache
        _refuse(exc)


def _refuse(exc: Exception) -> NoReturn:
    """A setting that cannot work: one line on stderr, exit code 2."""
    message = exc.message if isinstance(exc, TokenspoutError) else str(exc)
    typer.echo(f"tokenspout serve: configuration error: {message}", err=True)
    raise typer.Exit(2) from None


def _check_tls(certfile: str, keyfile: str) -> None:
    """Load the certificate and key as the server will, before the model loads: a missing
    file or a key that is not the certificate's is one line naming the files, not a
    traceback."""
    try:
        tls_context(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"--ssl-certfile {certfile} and --ssl-keyfile {keyfile} cannot be loaded: {reason}"
        ) from None


def _from_env(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was read from its environment variable. (By the source's
    name: newer typers bring their own copy of click, whose ParameterSource is another class.)"""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "ENVIRONMENT"


def _engine(name: EngineName, from_env: set[str], **opts: Any) -> Engine:
    """The engine, given only the options the user set: its own defaults stay in one
    place, its constructor (the help texts quote them). An option set on the command line
    that this engine does not read is a ``ConfigError``; one from the environment is dropped."""
    given = {k: v.value if isinstance(v, StrEnum) else v for k, v in opts.items() if v is not None}
    reads = _ENGINE_FLAGS[name]
    unread = next((k for k in given if k not in reads and k not in from_env), None)
    if unread is not None:
        readers = ", ".join(
            f"--engine {e}" for e, flags in _ENGINE_FLAGS.items() if unread in flags
        )
        flag = unread.replace("_", "-")
        raise ConfigError(f"--{flag} does not apply to --engine {name} (only to {readers})")
    if "threads" in given:
        _check_threads(given["threads"])
    args = {reads[k]: v for k, v in given.items() if k in reads}
    if name is EngineName.upstream:
        from tokenspout.engine.upstream_engine import UpstreamEngine
        from tokenspout.engine.upstream_options import UpstreamOptions

        return UpstreamEngine(UpstreamOptions(urls=args.pop("urls", ()), **args))
    if name is EngineName.synthetic:
        from tokenspout.engine.synthetic_engine import SyntheticEngine

        err_console.print("[bold yellow]SYNTHETIC engine: echoes prompt words, not a model[/]")
        return SyntheticEngine(**args)
    from tokenspout.engine import block_kernels

    # Checked here, before the model loads: the engine's thread reads $TOKENSPOUT_KERNELS
    # as it loads the model, and a build this CPU cannot run was a traceback from there.
    block_kernels.isa()
    from tokenspout.engine.llm_engine import LLMEngine

    return LLMEngine(**args)


def _check_threads(threads: int) -> None:
    """Refuse more model threads than the CPUs this process may use: they only contend
    (``--threads 1000`` on two cores held the first request for a second)."""
    from tokenspout.engine.cpu_budget import usable_cpus

    usable = usable_cpus()
    if threads > usable:
        raise ConfigError(
            f"--threads {threads} is more than the {usable} CPU(s) this process may use"
        )


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: a line per upstream request and health check.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # One bare JSON object per line for the request log, so that log shippers parse it as is.
    request_log = logging.getLogger("tokenspout.requests")
    request_log.addHandler(logging.StreamHandler())
    request_log.propagate = False
