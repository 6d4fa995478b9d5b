"""tokenspout: serve a model with streaming APIs, or complete a prompt live in the terminal."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

from tokenspout.client.chunk_reader import StreamError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err_console = Console(stderr=True)


class EngineName(StrEnum):
    embedded = "embedded"
    synthetic = "synthetic"


class WeightFormat(StrEnum):
    int8 = "int8"
    bf16 = "bf16"
    fp32 = "fp32"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    engine: Annotated[
        EngineName, typer.Option(help="embedded: the real model on the CPU; synthetic: load tests.")
    ] = EngineName.embedded,
    model: Annotated[
        str | None,
        typer.Option(help="GGUF file or Hugging Face model directory (default: SmolLM2-135M)."),
    ] = None,
    served_model_name: Annotated[
        list[str] | None, typer.Option(help="Extra names requests may use for the model.")
    ] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Running batch size.")] = None,
    max_model_len: Annotated[int, typer.Option(help="Context length (prompt + output).")] = 2048,
    max_prefill_tokens: Annotated[int, typer.Option(help="Prompt tokens per step.")] = 256,
    weights: Annotated[WeightFormat, typer.Option(help="Weight format.")] = WeightFormat.int8,
    prefix_cache: Annotated[bool, typer.Option(help="Reuse KV of shared prompt prefixes.")] = True,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: cores).")] = None,
    synthetic_ttft_ms: Annotated[float, typer.Option(help="Synthetic engine TTFT.")] = 0.0,
    synthetic_itl_ms: Annotated[float, typer.Option(help="Synthetic time between tokens.")] = 0.0,
    flush_tokens: Annotated[int, typer.Option(help="Coalesce up to N tokens per event.")] = 5,
    flush_ms: Annotated[float, typer.Option(help="...or send after this many ms.")] = 50.0,
    heartbeat_interval_s: Annotated[float, typer.Option(help="SSE ': ping' when idle.")] = 15.0,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens when omitted.")] = 512,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens allowed.")] = 4096,
    max_prompt_chars: Annotated[int, typer.Option(help="Largest prompt in characters.")] = 100_000,
    max_streams: Annotated[int, typer.Option(help="Open streams before 429.")] = 20_000,
    max_queued: Annotated[int, typer.Option(help="Queued requests before 429.")] = 1024,
    send_timeout_s: Annotated[
        float, typer.Option(help="Close a client that stops reading.")
    ] = 30.0,
    drain_timeout_s: Annotated[float, typer.Option(help="Grace for streams on SIGTERM.")] = 10.0,
    resumable: Annotated[
        bool, typer.Option(help="Streams resumable by default (stream_options.resumable).")
    ] = False,
    resume_grace_s: Annotated[
        float, typer.Option(help="A resumable stream whose client left waits this long.")
    ] = 30.0,
    resume_ttl_s: Annotated[
        float, typer.Option(help="Finished resumable streams stay replayable this long.")
    ] = 300.0,
    max_stream_buffer_bytes: Annotated[
        int, typer.Option(help="Replay memory per stream (oldest text evicted).")
    ] = 4 << 20,
    max_buffer_bytes: Annotated[int, typer.Option(help="Replay memory in total.")] = 256 << 20,
    api_key: Annotated[
        str | None, typer.Option(envvar="TOKENSPOUT_API_KEY", help="Require this bearer token.")
    ] = None,
    allowed_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allow browser pages from this origin (CORS); repeatable, * for any."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_prompts: Annotated[
        bool, typer.Option(help="Include prompts in the per-request JSON log lines.")
    ] = False,
) -> None:
    """Serve a model over HTTP (SSE, NDJSON) with an OpenAI-compatible API."""
    from tokenspout.engine.interface import Engine
    from tokenspout.server.app import create_app
    from tokenspout.server.config import ServerConfig
    from tokenspout.server.serve import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # One bare JSON object per line for the request log, so that log shippers parse it as is.
    request_log = logging.getLogger("tokenspout.requests")
    request_log.addHandler(logging.StreamHandler())
    request_log.propagate = False
    try:
        config = ServerConfig(
            host=host,
            port=port,
            default_max_tokens=default_max_tokens,
            max_tokens_limit=max_tokens_limit,
            max_prompt_chars=max_prompt_chars,
            flush_tokens=flush_tokens,
            flush_ms=flush_ms,
            heartbeat_interval_s=heartbeat_interval_s,
            max_streams=max_streams,
            max_queued=max_queued,
            send_timeout_s=send_timeout_s,
            drain_timeout_s=drain_timeout_s,
            resumable=resumable,
            resume_grace_s=resume_grace_s,
            resume_ttl_s=resume_ttl_s,
            max_stream_buffer_bytes=max_stream_buffer_bytes,
            max_buffer_bytes=max_buffer_bytes,
            api_key=api_key,
            model_aliases=tuple(served_model_name or ()),
            allowed_origins=tuple(allowed_origin or ()),
            log_prompts=log_prompts,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    built: Engine
    if engine is EngineName.synthetic:
        from tokenspout.engine.synthetic_engine import SyntheticEngine

        err_console.print("[bold yellow]SYNTHETIC engine: echoes prompt words, not a model[/]")
        built = SyntheticEngine(
            ttft_ms=synthetic_ttft_ms,
            itl_ms=synthetic_itl_ms,
            max_num_seqs=max_num_seqs or 100_000,
            max_model_len=max_model_len,
        )
    else:
        from tokenspout.engine.llm_engine import LLMEngine

        built = LLMEngine(
            model,
            max_num_seqs=max_num_seqs or 16,
            max_model_len=max_model_len,
            max_prefill_tokens=max_prefill_tokens,
            weights=weights.value,
            prefix_cache=prefix_cache,
            num_threads=threads,
        )
    application = create_app(built, config)
    run(application, application.state.tokenspout, host=host, port=port, log_level=log_level)


@app.command()
def complete(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    url: Annotated[str, typer.Option(help="Server URL.")] = "http://127.0.0.1:8000",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.7,
    raw: Annotated[bool, typer.Option(help="Plain completion instead of chat.")] = False,
    api_key: Annotated[str | None, typer.Option(envvar="TOKENSPOUT_API_KEY")] = None,
) -> None:
    """Stream an answer to the terminal as it is generated."""
    from tokenspout.client.client import Client

    params = {"max_tokens": max_tokens, "temperature": temperature}
    with Client(url, api_key=api_key) as client:
        stream = (
            client.stream_completion(prompt, **params)
            if raw
            else client.stream_chat(prompt, **params)
        )
        try:
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
        except StreamError as exc:
            err_console.print(f"\n[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("\n[yellow]stopped[/]")
            raise typer.Exit(130) from None
    result = stream.result
    sys.stdout.write("\n")
    ttft = f"{result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else "-"
    total = f"{result.total_s:.2f} s" if result.total_s is not None else "-"
    err_console.print(f"[dim]TTFT {ttft} · total {total} · finish {result.finish_reason}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
