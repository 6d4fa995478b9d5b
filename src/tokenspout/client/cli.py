"""The client commands: ``tokenspout complete`` (an answer live in the terminal) and
``tokenspout bench`` (a load test). ``tokenspout.cli`` puts them beside ``serve``."""

from __future__ import annotations

import importlib.util
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tokenspout.client.chunk_reader import StreamError

if TYPE_CHECKING:
    from tokenspout.client.bench import BenchConfig, LevelResult

err_console = Console(stderr=True)
E = TypeVar("E", bound=StrEnum)


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

    if not 0 <= temperature < math.inf:
        # Checked here: NaN or infinity cannot be sent in JSON (a traceback, not a message).
        raise typer.BadParameter(
            f"must be a finite number >= 0, not {temperature}", param_hint="--temperature"
        )
    params = {"max_tokens": max_tokens, "temperature": temperature}
    try:
        client = Client(url, api_key=api_key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from None
    with client:
        try:
            stream = (
                client.stream_completion(prompt, **params)
                if raw
                else client.stream_chat(prompt, **params)
            )
        except ValueError as exc:  # bytes that are not UTF-8 in the argument, say
            raise typer.BadParameter(str(exc), param_hint="PROMPT") from None
        try:
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
        except StreamError as exc:
            # The server's words, not Rich markup: "[model]" in them was dropped, "[/x]" raised.
            err_console.print(f"\n[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("\n[yellow]stopped[/]")
            raise typer.Exit(130) from None
    result = stream.result
    sys.stdout.write("\n")
    ttft = f"{result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else "-"
    total = f"{result.total_s:.2f} s" if result.total_s is not None else "-"
    err_console.print(f"[dim]TTFT {ttft} · total {total} · finish {result.finish_reason}[/]")


def bench(
    url: Annotated[str, typer.Option(help="Server URL (ours, vLLM, llama.cpp, Ollama /v1).")] = (
        "http://127.0.0.1:8000"
    ),
    endpoint: Annotated[str, typer.Option(help="chat, completions or seed.")] = "chat",
    protocol: Annotated[str, typer.Option(help="sse, ndjson or ws (/v1/ws); seed: sse.")] = "sse",
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
    distinct_prompts: Annotated[
        bool,
        typer.Option(
            help="Number each prompt ('Request 3. ...') so no two are the same: identical "
            "prompts share their first token's computation on some servers (ours)."
        ),
    ] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly max_tokens.")] = False,
    model: Annotated[str | None, typer.Option(help="Model (default: first of /v1/models).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TOKENSPOUT_API_KEY")] = None,
    timeout_s: Annotated[float, typer.Option(help="Limit for one request.")] = 600.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every figure to this file.")
    ] = None,
    plot_path: Annotated[
        Path | None,
        typer.Option("--plot", help="Write latency plots to this image (.png, .svg...)."),
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
            url=url, endpoint=_choice(BenchEndpoint, endpoint, "--endpoint"),
            protocol=_choice(BenchProtocol, protocol, "--protocol"),
            num_prompts=num_prompts, max_tokens=max_tokens, request_rate=request_rate,
            seed=seed, prompt=prompt, distinct_prompts=distinct_prompts,
            temperature=temperature, ignore_eos=ignore_eos,
            model=model, api_key=api_key, timeout_s=timeout_s,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        # Before the run, not a traceback after it with the figures lost.
        if path is not None and not path.resolve().parent.is_dir():
            raise typer.BadParameter(f"no folder {path.resolve().parent}", param_hint=option)
        if path is not None and path.is_dir():
            raise typer.BadParameter(f"{path} is a folder: name a file", param_hint=option)
    if plot_path is not None:
        _check_plot_path(plot_path)
    config = asyncio.run(discover_model(config))
    levels_done = _run_with_progress(config, levels, slos)
    Console().print(bench_report.table(levels_done, synthetic=config.synthetic))
    if json_path is not None:
        bench_report.write_json(json_path, config, levels_done)
    if plot_path is not None:
        from tokenspout.client.bench_plot import plot

        plot(levels_done, plot_path, synthetic=config.synthetic)
    if any(level.summary["failed"] for level in levels_done):
        for level in levels_done:
            for error in level.summary.get("errors", ()):
                err_console.print(f"[red]failed:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(1)


def _choice(kind: type[E], value: str, flag: str) -> E:
    """``value`` as one of ``kind``; else a usage error that names the flag and the choices
    (the enum's own "'foo' is not a valid BenchEndpoint" named neither)."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(kind)
        raise typer.BadParameter(f"{value!r} is not one of {choices}", param_hint=flag) from None


def _check_plot_path(path: Path) -> None:
    """Before the run, not after it with a traceback: matplotlib is an extra, and it writes
    only the formats it knows."""
    if importlib.util.find_spec("matplotlib") is None:
        raise typer.BadParameter(
            "needs matplotlib: pip install 'tokenspout[bench]'", param_hint="--plot"
        )
    from tokenspout.client.bench_plot import check_path

    try:
        check_path(path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--plot") from None


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
