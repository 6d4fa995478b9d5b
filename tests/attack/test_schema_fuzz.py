"""Schemathesis against the running server's OpenAPI schema: every documented operation,
with a key, without one, and on a server without keys. No 5xx, every answer as the schema
says (status, content type, body), nothing hangs (each call has a timeout).

Driven through hypothesis directly (one ``@given`` per operation) rather than schemathesis'
pytest plugin, whose fixture loader does not work with this pytest.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine

KEY = "sk-fuzz"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 20


@pytest.mark.parametrize("auth", ["no-keys", "with-key", "without-key"])
def test_no_5xx_and_answers_match_the_schema(start_server, auth: str) -> None:  # type: ignore[no-untyped-def]
    keyed = auth != "no-keys"
    server: RunningServer = start_server(
        SyntheticEngine(), api_key=KEY if keyed else None, max_tokens_limit=64,
        default_max_tokens=16,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"} if auth == "with-key" else {}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9  # the generation endpoints are in the schema
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

        fuzz()
