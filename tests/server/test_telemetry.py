"""POST /v1/telemetry: a page's perceived-latency report lands in the client_* metrics;
anything malformed, oversized or carrying extra fields (a prompt) is refused."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import RunningServer

REPORT = {
    "transport": "websocket",
    "ttft_ms": 120.5,
    "first_paint_ms": 135,
    "complete_ms": 2400.0,
    "long_frames": 3,
}


def test_report_is_recorded_per_transport(synthetic_server: RunningServer) -> None:
    url = f"{synthetic_server.url}/v1/telemetry"
    assert httpx.post(url, json=REPORT).status_code == 204
    assert httpx.post(url, json={**REPORT, "long_frames": 2}).status_code == 204
    label = 'transport="websocket"'
    assert synthetic_server.metric("tokenspout_client_ttft_seconds_count", label) == 2
    assert synthetic_server.metric("tokenspout_client_ttft_seconds_sum", label) == 0.241
    assert synthetic_server.metric("tokenspout_client_first_paint_seconds_count", label) == 2
    assert synthetic_server.metric("tokenspout_client_complete_seconds_sum", label) == 4.8
    assert synthetic_server.metric("tokenspout_client_long_frames_total", label) == 5


def test_a_report_without_complete_ms_is_not_a_complete_answer(
    synthetic_server: RunningServer,
) -> None:
    # A stopped or failed answer: its first token and first paint count, its end does not.
    url = f"{synthetic_server.url}/v1/telemetry"
    stopped = {k: v for k, v in REPORT.items() if k != "complete_ms"}
    assert httpx.post(url, json=stopped).status_code == 204
    assert httpx.post(url, json={**stopped, "complete_ms": None}).status_code == 204
    label = 'transport="websocket"'
    assert synthetic_server.metric("tokenspout_client_ttft_seconds_count", label) == 2
    assert synthetic_server.metric("tokenspout_client_first_paint_seconds_count", label) == 2
    assert synthetic_server.metric("tokenspout_client_long_frames_total", label) == 6
    with pytest.raises(KeyError):  # never observed for this transport
        synthetic_server.metric("tokenspout_client_complete_seconds_count", label)
    assert httpx.post(url, json=REPORT).status_code == 204
    assert synthetic_server.metric("tokenspout_client_complete_seconds_count", label) == 1


def test_openapi_says_complete_ms_is_optional(synthetic_server: RunningServer) -> None:
    schema = httpx.get(f"{synthetic_server.url}/openapi.json").json()
    telemetry = schema["components"]["schemas"]["ClientTelemetry"]
    assert "complete_ms" not in telemetry["required"]
    assert "stopped" in telemetry["properties"]["complete_ms"]["description"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"ttft_ms": -1}, "ttft_ms"),
        ({"complete_ms": 1e12}, "complete_ms"),
        ({"first_paint_ms": "135"}, "first_paint_ms"),
        ({"long_frames": 1.5}, "long_frames"),
        ({"long_frames": True}, "long_frames"),
        ({"prompt": "my secret question"}, "prompt"),
        ({"complete_ms": 100.0}, "complete_ms"),  # before its own first token
        ({"first_paint_ms": 1.0}, "first_paint_ms"),  # painted before it came
    ],
)
def test_bad_reports_are_400_naming_the_field(
    synthetic_server: RunningServer, change: dict[str, object], field: str
) -> None:
    r = httpx.post(f"{synthetic_server.url}/v1/telemetry", json={**REPORT, **change})
    assert r.status_code == 400
    assert field in r.json()["error"]["message"]


def test_missing_field_and_non_json_are_400(synthetic_server: RunningServer) -> None:
    url = f"{synthetic_server.url}/v1/telemetry"
    partial = {k: v for k, v in REPORT.items() if k != "ttft_ms"}
    assert httpx.post(url, json=partial).status_code == 400
    json_type = {"content-type": "application/json"}
    assert httpx.post(url, content=b"not json", headers=json_type).status_code == 400


def test_oversized_report_is_413_and_records_nothing(synthetic_server: RunningServer) -> None:
    r = httpx.post(f"{synthetic_server.url}/v1/telemetry", json={**REPORT, "pad": "x" * 5000})
    assert r.status_code == 413
    with pytest.raises(KeyError):
        synthetic_server.metric("tokenspout_client_ttft_seconds_count", 'transport="websocket"')
