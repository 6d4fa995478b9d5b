"""A key's allowed models are checked against the model the request resolved to, not
against everything the server serves (in front of upstreams, that is several models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokenspout.errors import PermissionDeniedError
from tokenspout.server.api_keys import ApiKey, digest
from tokenspout.server.key_admission import check_model

# Only what check_model reads: the engine's own model id and the server's aliases.
STATE = SimpleNamespace(
    engine=SimpleNamespace(model_id="own"), config=SimpleNamespace(model_aliases=("alias",))
)


def key(*models: str) -> ApiKey:
    return ApiKey("k", digest("sk"), models=frozenset(models))


@pytest.mark.parametrize(
    ("allowed", "model"),
    [(("a",), "a"), (("own",), "own"), (("alias",), "own")],
)
def test_an_allowed_model_passes(allowed: tuple[str, ...], model: str) -> None:
    check_model(STATE, key(*allowed), model)  # type: ignore[arg-type]


@pytest.mark.parametrize(("allowed", "model"), [(("a",), "b"), (("a",), "own"), (("own",), "a")])
def test_another_served_model_is_403(allowed: tuple[str, ...], model: str) -> None:
    with pytest.raises(PermissionDeniedError, match=repr(model)):
        check_model(STATE, key(*allowed), model)  # type: ignore[arg-type]
