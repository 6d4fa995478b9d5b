"""uvicorn's "returned without completing" line is dropped for a response cut on purpose
only: one left incomplete by anything else (a bug) is still logged."""

from __future__ import annotations

import contextvars
import logging

from tokenspout.server.cut_responses import INCOMPLETE, DropPurposefulCuts, cut_on_purpose


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, None, None)


def test_only_a_request_cut_on_purpose_loses_the_incomplete_line() -> None:
    drop = DropPurposefulCuts()

    def cut() -> tuple[bool, bool]:
        cut_on_purpose("moved")
        return drop.filter(record(INCOMPLETE)), drop.filter(record("Exception in ASGI app"))

    assert contextvars.copy_context().run(cut) == (False, True)
    # Another request (another task's context) is not marked.
    assert contextvars.copy_context().run(lambda: drop.filter(record(INCOMPLETE)))
