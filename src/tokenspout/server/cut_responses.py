"""A response cut on purpose is no error in the log.

A stream's HTTP reader is cut without an end when its client is to resume elsewhere (the
stream moved to another replica, a drain handed it over) or when it stopped reading (the
send timeout): the incomplete chunked body is what tells the client the answer is not
whole. ASGI has no message for "abort this response", so the app returns without
completing it, and uvicorn then closes the connection, as wanted, but logs "ASGI callable
returned without completing response." at ERROR: one error line per cut stream, hundreds in
a rolling restart. The request's own log line (``tokenspout.requests``) and
``tokenspout_requests_aborted_total`` already say why it was cut.

``DisconnectWatch`` marks the request's context when it stops a body (``cut_on_purpose``);
uvicorn logs in the same task, right after the app returns, so a filter on its logger
drops that line for marked requests only. A response left incomplete by anything else (a
bug) is still logged.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

#: uvicorn's message (``uvicorn.protocols.http``: every implementation logs the same).
INCOMPLETE = "ASGI callable returned without completing response."

#: Why this request's response was cut, in the context of the task that runs the app.
_cut: ContextVar[str | None] = ContextVar("tokenspout_cut_response", default=None)


def cut_on_purpose(reason: str) -> None:
    """Mark the current request's response as cut on purpose (``reason``)."""
    _cut.set(reason)


class DropPurposefulCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == INCOMPLETE and _cut.get() is not None)


def quiet_purposeful_cuts() -> None:
    """Install the filter on ``uvicorn.error`` (after ``uvicorn.Config`` set it up)."""
    logging.getLogger("uvicorn.error").addFilter(DropPurposefulCuts())
