"""tokenspout: serve a model with streaming APIs, or complete a prompt live in the terminal."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from tokenspout.client.chunk_reader import StreamError

if TYPE_CHECKING:
    from tokenspout.client.bench import BenchConfig, LevelResult

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
    synthetic_itl_ms: Annotated[
        float, typer.Option(help="Synthetic decode step: every running request gets a token.")
    ] = 0.0,
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
    otlp_traces_endpoint: Annotated[
        str | None,
        typer.Option(help="Export a trace per request over OTLP/HTTP, e.g. http://host:4318."),
    ] = None,
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
            otlp_traces_endpoint=otlp_traces_endpoint,
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


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="Server URL (ours, vLLM, llama.cpp, Ollama /v1).")] = (
        "http://127.0.0.1:8000"
    ),
    endpoint: Annotated[str, typer.Option(help="chat, completions or seed.")] = "chat",
    protocol: Annotated[str, typer.Option(help="sse, ndjson or ws (our /v1/ws).")] = "sse",
    concurrency: Annotated[str, typer.Option(help="Requests in flight; 1,4,16 sweeps.")] = "1",
    num_prompts: Annotated[int, typer.Option(help="Requests per concurrency level.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 128,
    request_rate: Annotated[
        float, typer.Option(help="Poisson requests/s (seeded); inf sends all at once.")
    ] = float("inf"),
    seed: Annotated[int, typer.Option(help="Seed of the arrival process.")] = 0,
    goodput: Annotated[
        str | None, typer.Option(help="SLOs for goodput, e.g. ttft:500,tpot:50,e2el:5000 (ms).")
    ] = None,
    prompt: Annotated[str, typer.Option(help="The prompt of every request.")] = (
        "Write a long story about a dragon and a knight."
    ),
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly max_tokens.")] = False,
    model: Annotated[str | None, typer.Option(help="Model (default: first of /v1/models).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TOKENSPOUT_API_KEY")] = None,
    timeout_s: Annotated[float, typer.Option(help="Limit for one request.")] = 600.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every figure to this file.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write latency plots to this PNG.")
    ] = None,
) -> None:
    """Load-test a streaming server: TTFT, TPOT, ITL, E2EL, throughput and goodput."""
    import asyncio

    from tokenspout.client import bench_report
    from tokenspout.client.bench import BenchConfig, BenchEndpoint, BenchProtocol, discover_model
    from tokenspout.client.bench_metrics import parse_goodput

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
        if not levels or min(levels) < 1:
            raise ValueError("--concurrency: give positive integers, e.g. 1,4,16")
        slos = parse_goodput(goodput)
        config = BenchConfig(
            url=url, endpoint=BenchEndpoint(endpoint), protocol=BenchProtocol(protocol),
            num_prompts=num_prompts, max_tokens=max_tokens, request_rate=request_rate,
            seed=seed, prompt=prompt, temperature=temperature, ignore_eos=ignore_eos,
            model=model, api_key=api_key, timeout_s=timeout_s,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if config.model is None and config.endpoint is not BenchEndpoint.seed:
        config = replace(config, model=asyncio.run(discover_model(config)))
    levels_done = _run_with_progress(config, levels, slos)
    Console().print(bench_report.table(levels_done))
    if json_path is not None:
        bench_report.write_json(json_path, config, levels_done)
    if plot_path is not None:
        from tokenspout.client.bench_plot import plot

        plot(levels_done, plot_path)
    if any(level.summary["failed"] for level in levels_done):
        for level in levels_done:
            for error in level.summary.get("errors", ()):
                err_console.print(f"[red]failed:[/] {error}")
        raise typer.Exit(1)


def _run_with_progress(
    config: BenchConfig, levels: list[int], slos: dict[str, float]
) -> list[LevelResult]:
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from tokenspout.client.bench import run_sweep

    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        # Each bar's clock starts with its level, not with the whole sweep.
        tasks = {
            c: progress.add_task(f"concurrency {c}", total=config.num_prompts, start=False)
            for c in levels
        }
        sweep = run_sweep(
            config,
            levels,
            slos,
            on_done=lambda c, _r: progress.advance(tasks[c]),
            on_start=lambda c: progress.start_task(tasks[c]),
        )
        return asyncio.run(sweep)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
