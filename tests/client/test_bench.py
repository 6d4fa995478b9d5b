"""``tokenspout bench`` end to end against a synthetic server."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tokenspout.client.bench import BenchConfig, BenchProtocol, run_level
from tokenspout.engine.synthetic_engine import SyntheticEngine


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "bench", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def slow_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(SyntheticEngine(ttft_ms=100, itl_ms=10))


def test_bench_measures_the_synthetic_ttft(slow_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    plot = tmp_path / "plot.png"
    run = bench(
        "--url", slow_server.url, "--concurrency", "8", "--num-prompts", "16",
        "--max-tokens", "40", "--json", str(out), "--plot", str(plot),
        "--goodput", "ttft:600000,tpot:600000",  # met by any run: goodput is its bookkeeping
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "median TTFT (ms)" in run.stdout
    # Never to be taken for a model's figures: the table and the JSON say so.
    assert "SYNTHETIC engine" in run.stdout
    data = json.loads(out.read_text())
    assert data["synthetic"] is True
    assert data["completed"] == 16 and data["failed"] == 0 and data["concurrency"] == 8
    # Lower bounds only: the synthetic engine cannot be faster than its 100 ms first token
    # and 10 ms steps, while a loaded machine can make anything slower.
    assert data["median_ttft_ms"] >= 80
    # The server's usage count, not the (coalesced) event count.
    assert data["total_output_tokens"] == 16 * 40
    assert data["median_tpot_ms"] >= 8
    # Default coalescing sends ~5 tokens per event: chunks are several steps apart.
    assert data["median_itl_ms"] >= 30
    assert data["median_e2el_ms"] >= data["median_ttft_ms"] + 39 * 8
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert plot.stat().st_size > 10_000


def test_sweep_writes_one_entry_per_concurrency(slow_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    run = bench(
        "--url", slow_server.url + "/v1", "--concurrency", "1,4", "--num-prompts", "4",
        "--max-tokens", "5", "--endpoint", "completions", "--protocol", "ndjson",
        "--json", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert [d["concurrency"] for d in data] == [1, 4]
    assert all(d["completed"] == 4 and d["total_output_tokens"] == 20 for d in data)
    assert all(d["protocol"] == "ndjson" and d["model"] == "synthetic" for d in data)


def test_a_model_named_otherwise_is_still_labelled_synthetic(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server(SyntheticEngine(), model_aliases=("gpt-4o",))
    out = tmp_path / "named.json"
    run = bench(
        "--url", server.url, "--model", "gpt-4o", "--concurrency", "1", "--num-prompts", "1",
        "--max-tokens", "2", "--json", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "SYNTHETIC engine" in run.stdout
    data = json.loads(out.read_text())
    assert data["model"] == "gpt-4o" and data["synthetic"] is True


def test_a_seed_run_is_labelled_synthetic_too(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # The seed endpoint skipped GET /v1/models, so its figures were not said to be synthetic.
    server = start_server(SyntheticEngine())
    out = tmp_path / "seed.json"
    run = bench(
        "--url", server.url, "--endpoint", "seed", "--num-prompts", "1", "--max-tokens", "2",
        "--json", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "SYNTHETIC engine" in run.stdout
    data = json.loads(out.read_text())
    # Its requests still name no model: the server serves its own.
    assert data["synthetic"] is True and data["model"] is None


@pytest.mark.parametrize(
    ("endpoint", "protocol"), [("chat", "ws"), ("completions", "ws"), ("seed", "sse")]
)
def test_other_transports(
    endpoint: str, protocol: str, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server(SyntheticEngine(itl_ms=2), flush_tokens=1, flush_ms=0)
    config = BenchConfig(
        url=server.url, endpoint=endpoint, protocol=protocol,  # type: ignore[arg-type]
        num_prompts=6, max_tokens=7, prompt="a b c",
    )  # fmt: skip
    level = asyncio.run(run_level(config, 3))
    assert level.summary["completed"] == 6, level.summary.get("errors")
    # One token per event here, so the seed's chunk count is the token count too.
    assert level.summary["total_output_tokens"] == 42
    assert all(len(r.itl) == 6 for r in level.results)


def test_seed_tokens_are_counted_whatever_the_server_coalesces(
    start_server: Callable[..., RunningServer],
) -> None:
    # The seed's events carry no usage: the bench asks one event per token, as the seed
    # article's endpoint sends them. Against coalescing it counted events (16 tokens as 4).
    server = start_server(SyntheticEngine(itl_ms=2), flush_tokens=4, flush_ms=1000)
    config = BenchConfig(url=server.url, endpoint="seed", num_prompts=4, max_tokens=16)  # type: ignore[arg-type]
    level = asyncio.run(run_level(config, 2))
    assert level.summary["completed"] == 4, level.summary.get("errors")
    assert level.summary["total_output_tokens"] == 64


def test_plot_without_matplotlib_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # matplotlib is an extra (tokenspout[bench]): without it, --plot ran the whole benchmark,
    # then printed a traceback and exited 0.
    from typer.testing import CliRunner

    from tokenspout.cli import app

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    png = tmp_path / "x.png"
    url = "http://127.0.0.1:9"  # nothing listens: the run must not start
    result = CliRunner().invoke(app, ["bench", "--url", url, "--plot", str(png)])
    assert result.exit_code == 2, result.output
    assert "matplotlib" in result.output and "Traceback" not in result.output
    assert not png.exists()


def test_poisson_arrivals_spread_the_requests(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(SyntheticEngine())
    config = BenchConfig(url=server.url, num_prompts=10, max_tokens=2, request_rate=50.0, seed=1)
    level = asyncio.run(run_level(config, 10))
    assert level.summary["completed"] == 10
    # Ten exponential gaps of mean 20 ms: the run cannot end at once.
    assert level.summary["duration_s"] > 0.05


def test_failures_are_reported(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    server = start_server(SyntheticEngine(), api_key="secret")
    out = tmp_path / "f.json"
    run = bench("--url", server.url, "--num-prompts", "2", "--max-tokens", "2", "--json", str(out))
    assert run.returncode == 1
    assert "HTTP 401" in run.stderr
    assert json.loads(out.read_text())["failed"] == 2
    ok = BenchConfig(url=server.url, num_prompts=2, max_tokens=2, api_key="secret")
    assert asyncio.run(run_level(ok, 2)).summary["completed"] == 2
    ws = BenchConfig(
        url=server.url, num_prompts=1, max_tokens=2, api_key="secret", protocol=BenchProtocol.ws
    )
    assert asyncio.run(run_level(ws, 1)).summary["completed"] == 1


def test_an_output_into_no_folder_is_refused_before_the_run(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"  # nothing listens: the run must not start
    for option in ("--json", "--plot"):
        run = bench("--url", url, option, str(tmp_path / "missing" / "x.out"))
        assert run.returncode == 2 and "no folder" in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [("--json", ".", "is a folder"), ("--plot", ".", "is a folder"),
     ("--plot", "out.txt", "does not end in .png"), ("--plot", "out", "does not end in .png")],
)  # fmt: skip
def test_an_output_that_cannot_be_written_as_named_is_refused_before_the_run(
    tmp_path: Path, option: str, name: str, message: str
) -> None:
    # A folder, or a suffix matplotlib does not know, was a traceback after the whole run
    # with the figures lost; "out" was silently written as out.png.
    if option == "--plot":
        pytest.importorskip("matplotlib")
    run = bench("--url", "http://127.0.0.1:9", option, str(tmp_path / name))
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [("--endpoint", "foo", "chat, completions, seed"), ("--protocol", "grpc", "sse, ndjson, ws")],
)
def test_an_unknown_choice_names_its_flag_and_the_choices(
    flag: str, value: str, choices: str
) -> None:
    # It was "'foo' is not a valid BenchEndpoint": neither the flag nor what it takes.
    run = bench("--url", "http://127.0.0.1:9", flag, value)
    assert run.returncode == 2, run.stderr
    assert f"Invalid value for {flag}: {value!r} is not one of {choices}" in run.stderr


def test_settings_that_cannot_hold_are_refused_before_the_run() -> None:
    # The seed endpoint has no ignore_eos: it was left out of the requests, and the --json
    # said it was on. NaN requests per second passed the "> 0" check.
    url = "http://127.0.0.1:9"
    for args in (("--endpoint", "seed", "--ignore-eos"), ("--request-rate", "nan")):
        run = bench("--url", url, *args)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--temperature", "nan"), ("--timeout-s", "0"), ("--timeout-s", "-5"), ("--timeout-s", "nan")],
)
def test_a_setting_every_request_would_fail_on_is_refused_naming_its_flag(
    flag: str, value: str
) -> None:
    # They were accepted, and every request then failed (exit 1 after the whole run).
    run = bench("--url", "http://127.0.0.1:9", flag, value)
    assert run.returncode == 2 and f"{flag} must be" in run.stderr, run.stderr


def test_a_stream_closed_before_done_is_a_failure() -> None:
    # A proxy that closed the stream cleanly after one chunk: not a completed request.
    from tests.client.test_client import answering

    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"half"}}]}\n\n'
    with answering(chunk) as url:
        config = BenchConfig(url=url, num_prompts=1, max_tokens=4, model="m")
        level = asyncio.run(run_level(config, 1))
    assert level.summary["completed"] == 0 and level.summary["failed"] == 1


def test_a_level_runs_with_the_objects_from_before_it_frozen(
    start_server: Callable[..., RunningServer],
) -> None:
    # A full garbage collection during a burst delayed every request's first read (TTFT p50
    # of 16 at once 25-35 ms where the server took 2-4): the level runs with the process's
    # objects frozen (out of the collector's scans), and gives them back after.
    server = start_server(SyntheticEngine())
    frozen: list[int] = []
    config = BenchConfig(url=server.url, num_prompts=3, max_tokens=2)
    level = asyncio.run(
        run_level(config, 3, on_done=lambda _r: frozen.append(gc.get_freeze_count()))
    )
    assert level.summary["completed"] == 3
    assert min(frozen) > 0
    assert gc.get_freeze_count() == 0


def test_distinct_prompts_are_numbered_and_said_in_the_json(
    slow_server: RunningServer, tmp_path: Path
) -> None:
    from tokenspout.client.bench import request_body

    same = BenchConfig(prompt="Tell a story.", model="m")
    assert request_body(same, 0) == request_body(same, 5)
    distinct = BenchConfig(prompt="Tell a story.", model="m", distinct_prompts=True)
    contents = [request_body(distinct, i)["messages"][0]["content"] for i in range(2)]
    assert contents == ["Request 1. Tell a story.", "Request 2. Tell a story."]
    out = tmp_path / "distinct.json"
    run = bench(
        "--url", slow_server.url, "--num-prompts", "2", "--max-tokens", "3",
        "--distinct-prompts", "--json", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["distinct_prompts"] is True and data["completed"] == 2


def test_seed_tokens_are_counted_from_the_event_ids() -> None:
    # One event may hold several tokens (those of one UTF-8 character): counted as one
    # token each, a Japanese answer read as half its tokens and twice its TPOT.
    from tests.client.test_client import answering

    body = (
        b"id: s1:0\n\n"
        + 'id: s1:2\ndata: {"token":"日"}\n\n'.encode()
        + b'id: s1:3\ndata: {"token":"a"}\n\n'
        + b"data: [DONE]\n\n"
    )
    with answering(body) as url:
        config = BenchConfig(url=url, endpoint="seed", num_prompts=1, max_tokens=4)  # type: ignore[arg-type]
        level = asyncio.run(run_level(config, 1))
    assert level.summary["completed"] == 1, level.summary.get("errors")
    assert level.summary["total_output_tokens"] == 3


def test_an_ndjson_stream_closed_before_its_finish_is_a_failure() -> None:
    # NDJSON's end is the body's end: a clean close after one chunk counted as completed.
    from tests.client.test_client import answering

    chunk = b'{"choices":[{"index":0,"delta":{"content":"half"}}]}\n'
    with answering(chunk) as url:
        config = BenchConfig(url=url, num_prompts=1, max_tokens=4, model="m", protocol="ndjson")  # type: ignore[arg-type]
        level = asyncio.run(run_level(config, 1))
    assert level.summary["completed"] == 0 and level.summary["failed"] == 1
    assert "finish_reason" in (level.results[0].error or "")


def test_a_request_over_the_time_limit_says_so(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(SyntheticEngine(itl_ms=50))
    config = BenchConfig(url=server.url, num_prompts=1, max_tokens=100, timeout_s=0.2)
    level = asyncio.run(run_level(config, 1))
    assert level.results[0].error == "timed out after --timeout-s 0.2"  # it was "TimeoutError: "


def test_the_seed_endpoint_is_measured_over_sse_only() -> None:
    # Its NDJSON carries neither token counts nor an end to check.
    with pytest.raises(ValueError, match="SSE only"):
        BenchConfig(url="http://127.0.0.1:9", endpoint="seed", protocol="ndjson")  # type: ignore[arg-type]


@pytest.mark.parametrize("synthetic", [True, False])
def test_the_plot_of_a_synthetic_run_says_so(
    synthetic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The table and the JSON said it; the image, quoted on its own, did not.
    from matplotlib.figure import Figure

    from tokenspout.client.bench import SYNTHETIC_TITLE, LevelResult, RequestResult
    from tokenspout.client.bench_plot import plot

    titles: list[str] = []
    save = Figure.savefig

    def savefig(fig: Figure, *args: object, **kwargs: object) -> None:
        titles.append(fig.get_suptitle())
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    result = RequestResult(success=True, ttft=0.1, e2el=0.5, itl=[0.01, 0.02], output_tokens=3)
    summary = {"output_throughput": 6.0, "median_ttft_ms": 100.0}
    plot([LevelResult(1, summary, [result])], tmp_path / "p.png", synthetic=synthetic)
    assert titles == [SYNTHETIC_TITLE if synthetic else ""]
