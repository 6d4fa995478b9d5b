"""``POST /v1/telemetry``: what a page measured for one answer (never its text), recorded in
the server's ``tokenspout_client_*`` metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import Response

from tokenspout.server.metrics import CLIENT_TRANSPORTS
from tokenspout.server.request_parsing import parse_body
from tokenspout.server.server_state import state_of

router = APIRouter()

# A report is a few small numbers; anything larger is not one.
_MAX_BODY_BYTES = 1024
# An hour: longer than any answer, short enough to keep a bad clock out of the histograms.
Millis = Annotated[float, Field(ge=0.0, le=3_600_000.0, allow_inf_nan=False)]


class ClientTelemetry(BaseModel):
    """Times in milliseconds since the page sent the request."""

    # forbid: a report that carries anything else (a prompt, an answer) is refused.
    # Attribute docstrings become the fields' descriptions in the OpenAPI schema.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    transport: str
    ttft_ms: Millis
    first_paint_ms: Millis
    complete_ms: Millis | None = None
    """The whole answer received. Left out (or null) for an answer that was stopped or
    failed: it is then counted in TTFT and first paint only."""
    long_frames: Annotated[StrictInt, Field(ge=0, le=1_000_000)]

    @model_validator(mode="after")
    def _in_order(self) -> ClientTelemetry:
        # The answer is complete after its first token: a report saying otherwise is bogus.
        if self.complete_ms is not None and self.complete_ms < self.ttft_ms:
            raise ValueError("complete_ms must not be less than ttft_ms")
        # Nor is text painted before it came (painting may end after the last event does).
        if self.first_paint_ms < self.ttft_ms:
            raise ValueError("first_paint_ms must not be less than ttft_ms")
        return self

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        # A fixed set: the value becomes a metric label.
        if value not in CLIENT_TRANSPORTS:
            raise ValueError(f"must be one of {', '.join(CLIENT_TRANSPORTS)}")
        return value


@router.post("/v1/telemetry")
async def telemetry(request: Request) -> Response:
    state = state_of(request)
    report = await parse_body(request, ClientTelemetry, _MAX_BODY_BYTES)
    metrics = state.metrics
    metrics.client_ttft.labels(report.transport).observe(report.ttft_ms / 1000)
    metrics.client_first_paint.labels(report.transport).observe(report.first_paint_ms / 1000)
    if report.complete_ms is not None:
        metrics.client_complete.labels(report.transport).observe(report.complete_ms / 1000)
    metrics.client_long_frames.labels(report.transport).inc(report.long_frames)
    return Response(status_code=204)
