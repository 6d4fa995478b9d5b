"""``bench_metrics``: vLLM's definitions on hand-computed tables."""

from __future__ import annotations

import pytest

from tokenspout.client.bench_metrics import (
    RequestResult,
    latency_stats,
    meets_slos,
    parse_goodput,
    percentile,
    summarize,
)


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([], 50, 0.0),
        ([7.0], 99, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),  # rank 1.5: halfway between 2 and 3
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # order does not matter
        ([1.0, 2.0, 3.0, 4.0], 90, 3.7),  # rank 2.7
        ([10.0, 20.0, 30.0, 40.0, 50.0], 99, 49.6),  # rank 3.96
        ([10.0, 20.0, 30.0, 40.0, 50.0], 0, 10.0),
        ([10.0, 20.0, 30.0, 40.0, 50.0], 100, 50.0),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ttft", "e2el", "tokens", "tpot"),
    [
        (0.1, 0.5, 5, 0.1),  # (0.5 - 0.1) / 4
        (0.2, 1.2, 11, 0.1),
        (0.1, 0.1, 1, None),  # one token: no TPOT
        (None, None, 0, None),
    ],
)
def test_tpot(ttft: float | None, e2el: float | None, tokens: int, tpot: float | None) -> None:
    r = RequestResult(success=True, ttft=ttft, e2el=e2el, output_tokens=tokens)
    assert r.tpot == (pytest.approx(tpot) if tpot is not None else None)


def test_latency_stats_keys_and_values() -> None:
    stats = latency_stats("ttft", [0.1, 0.2, 0.3, 0.4])
    assert stats == pytest.approx(
        {
            "mean_ttft_ms": 250.0,
            "median_ttft_ms": 250.0,
            "std_ttft_ms": 111.80339887,  # population std of 100..400
            "p90_ttft_ms": 370.0,
            "p99_ttft_ms": 397.0,
            "max_ttft_ms": 400.0,
        }
    )


def test_summarize_a_hand_computed_run() -> None:
    # Request A: chunks at 0.10, 0.15, 0.25 s, usage says 5 tokens.
    a = RequestResult(True, ttft=0.10, e2el=0.25, itl=[0.05, 0.10], output_tokens=5)
    # Request B: chunks at 0.30, 0.32 s, 2 tokens.
    b = RequestResult(True, ttft=0.30, e2el=0.32, itl=[0.02], output_tokens=2)
    failed = RequestResult(error="ConnectError: refused")
    s = summarize([a, b, failed], duration_s=2.0, slos={"ttft": 200, "tpot": 50})
    assert s["num_prompts"] == 3 and s["completed"] == 2 and s["failed"] == 1
    assert s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.5)
    # TTFTs 100, 300 ms; TPOTs (250-100)/4 = 37.5 and (320-300)/1 = 20 ms.
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)
    assert s["mean_tpot_ms"] == pytest.approx(28.75)
    # ITL pools the gaps of both requests: 50, 100, 20 ms.
    assert s["mean_itl_ms"] == pytest.approx(170.0 / 3)
    assert s["median_itl_ms"] == pytest.approx(50.0)
    assert s["p90_itl_ms"] == pytest.approx(90.0)  # rank 1.8 between 50 and 100
    assert s["mean_e2el_ms"] == pytest.approx(285.0)
    # Goodput: A meets ttft 200 and tpot 50; B's TTFT of 300 ms misses. 1 good / 2 s.
    assert s["request_goodput"] == pytest.approx(0.5)
    assert s["errors"] == ["ConnectError: refused"]


def test_summarize_with_nothing_completed() -> None:
    s = summarize([RequestResult(error="x")], duration_s=1.0)
    assert s["completed"] == 0 and s["output_throughput"] == 0.0
    assert s["median_ttft_ms"] == 0.0 and "request_goodput" not in s


@pytest.mark.parametrize(
    ("spec", "slos"),
    [
        (None, {}),
        ("", {}),
        ("ttft:500", {"ttft": 500.0}),
        ("ttft:500, TPOT:50,e2el:2000.5", {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}),
    ],
)
def test_parse_goodput(spec: str | None, slos: dict[str, float]) -> None:
    assert parse_goodput(spec) == slos


@pytest.mark.parametrize("spec", ["ttft", "itl:5", "ttft:fast", "ttft:0"])
def test_parse_goodput_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="goodput SLO"):
        parse_goodput(spec)


@pytest.mark.parametrize(
    ("result", "slos", "good"),
    [
        (RequestResult(True, ttft=0.1, e2el=1.0, output_tokens=10), {"e2el": 1000}, True),
        (RequestResult(True, ttft=0.1, e2el=1.0, output_tokens=10), {"e2el": 999}, False),
        (RequestResult(True, ttft=0.1, e2el=1.0, output_tokens=10), {"tpot": 100}, True),
        (RequestResult(True, ttft=0.1, e2el=1.0, output_tokens=10), {"tpot": 99}, False),
        # One token: TPOT counts as 0, as in vLLM.
        (RequestResult(True, ttft=0.1, e2el=0.1, output_tokens=1), {"tpot": 1}, True),
        (RequestResult(True, output_tokens=0), {"ttft": 1000}, False),
    ],
)
def test_meets_slos(result: RequestResult, slos: dict[str, float], good: bool) -> None:
    assert meets_slos(result, slos) is good
