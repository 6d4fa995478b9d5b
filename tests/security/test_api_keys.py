"""The keys file: its shape, lookup by hash, reload, and the per-key limiter (pure)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from tokenspout.errors import RateLimitError
from tokenspout.server.api_keys import ApiKey, KeysFileError, KeyStore, digest, load_keys_file
from tokenspout.server.key_limits import InMemoryKeyLimiter

KEYS = """
[[keys]]
name = "alice"
key = "sk-alice"
max_concurrent_streams = 2
requests_per_minute = 60
tokens_per_minute = 100000
models = ["SmolLM2-135M-Instruct"]

[[keys]]
name = "bob"
key_sha256 = "{bob_sha}"
"""


def write_keys(path: Path, text: str = KEYS) -> Path:
    bob_sha = hashlib.sha256(b"sk-bob").hexdigest()
    path.write_text(text.replace("{bob_sha}", bob_sha))
    return path


def test_keys_file_shape(tmp_path: Path) -> None:
    alice, bob = load_keys_file(write_keys(tmp_path / "keys.toml"))
    assert alice.name == "alice" and alice.max_concurrent_streams == 2
    assert alice.requests_per_minute == 60 and alice.tokens_per_minute == 100_000
    assert alice.models == frozenset({"SmolLM2-135M-Instruct"})
    assert bob.name == "bob" and bob.models is None and bob.max_concurrent_streams is None


def test_lookup_by_hash_never_by_secret(tmp_path: Path) -> None:
    store = KeyStore("single", write_keys(tmp_path / "keys.toml"))
    assert store.authenticate("sk-alice").name == "alice"  # type: ignore[union-attr]
    assert store.authenticate("sk-bob").name == "bob"  # type: ignore[union-attr]
    assert store.authenticate("single").name == "default"  # type: ignore[union-attr]
    for wrong in ("sk-alic", "sk-alice ", "", None, "\ud800"):
        assert store.authenticate(wrong) is None
    # What is kept is the digest, not the secret.
    assert {k.sha256 for k in store._by_hash.values()} == {
        digest("sk-alice"),
        digest("sk-bob"),
        digest("single"),
    }


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[keys]\nname=", "not valid TOML"),
        ('[[keys]]\nname = "a"\n', "exactly one of key or key_sha256"),
        ('[[keys]]\nname = "a"\nkey = "x"\nkey_sha256 = "00"\n', "exactly one of key"),
        ('[[keys]]\nname = "a"\nkey_sha256 = "xyz"\n', "64 hex digits"),
        ('[[keys]]\nname = "a"\nkey = "x"\nrequests_per_minute = 0\n', "integer >= 1"),
        ('[[keys]]\nname = "a"\nkey = "x"\nrequest_per_minute = 5\n', "unknown field"),
        ('[[keys]]\nname = "a"\nkey = "x"\nmodels = "m"\n', "list of model names"),
        ('[[keys]]\nname = "a"\nkey = "x"\n[[keys]]\nname = "a"\nkey = "y"\n', "used twice"),
        ('[[keys]]\nname = "a"\nkey = "x"\n[[keys]]\nname = "b"\nkey = "x"\n', "same secret"),
        ("keys = 3\n", "array of tables"),
        ("other = 1\n", "unknown top-level"),
    ],
)
def test_malformed_keys_file_is_one_clear_error(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as info:
        KeyStore(None, path)
    message = str(info.value)
    assert says in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("secret", [" s3cr3t", "s3cr3t ", "s3cr3t\\t"])
def test_a_key_with_surrounding_whitespace_is_refused_naming_its_entry(
    tmp_path: Path, secret: str
) -> None:
    # It was accepted, and could never authenticate: a bearer token is read stripped.
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "alice"\nkey = "{secret}"\n')
    with pytest.raises(KeysFileError) as info:
        KeyStore(None, path)
    message = str(info.value)
    assert "key 'alice': key begins or ends with whitespace" in message
    assert "s3cr3t" not in message


def test_reload_swaps_keys_and_keeps_old_ones_on_error(tmp_path: Path) -> None:
    path = write_keys(tmp_path / "keys.toml")
    store = KeyStore(None, path)
    path.write_text('[[keys]]\nname = "carol"\nkey = "sk-carol"\n')
    assert store.reload()
    assert store.authenticate("sk-carol") is not None and store.authenticate("sk-alice") is None
    path.write_text("[[keys]\nbroken")
    assert not store.reload()
    assert store.authenticate("sk-carol") is not None
    path.write_text("")
    assert store.reload() and store.enabled  # an emptied file refuses everyone: auth stays on
    assert store.authenticate("sk-carol") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_streams_limit() -> None:
    limiter = InMemoryKeyLimiter(Clock())
    key = ApiKey("a", b"", max_concurrent_streams=2)
    limiter.admit(key, 1)
    limiter.admit(key, 1)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(key, 1)
    assert info.value.limit == "streams" and info.value.status_code == 429
    limiter.finished("a", 5)
    limiter.admit(key, 1)


def test_a_request_of_n_streams_is_one_request_counted_whole_or_not_at_all() -> None:
    limiter = InMemoryKeyLimiter(Clock())
    key = ApiKey("a", b"", max_concurrent_streams=3, requests_per_minute=2)
    limiter.admit(key, 1, 2)  # 2 streams, 1 request
    with pytest.raises(RateLimitError):  # 2 more would be 4 streams: nothing counted
        limiter.admit(key, 1, 2)
    limiter.admit(key, 1)  # the 3rd stream, and the 2nd request: the refusal took none
    with pytest.raises(RateLimitError) as info:
        limiter.admit(key, 1)
    assert info.value.limit == "streams"


def test_requests_per_minute_refill_and_retry_after() -> None:
    clock = Clock()
    limiter = InMemoryKeyLimiter(clock)
    key = ApiKey("a", b"", requests_per_minute=6)
    for _ in range(6):
        limiter.admit(key, 1)
        limiter.finished("a", 0)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(key, 1)
    assert info.value.limit == "requests" and info.value.retry_after_s == 10
    clock.now += 10
    limiter.admit(key, 1)


def test_tokens_per_minute_counts_prompt_and_completion() -> None:
    clock = Clock()
    limiter = InMemoryKeyLimiter(clock)
    key = ApiKey("a", b"", tokens_per_minute=600)
    limiter.admit(key, 100)
    limiter.finished("a", 500)  # 600 used: the balance is 0
    with pytest.raises(RateLimitError) as info:
        limiter.admit(key, 1)
    assert info.value.limit == "tokens" and info.value.retry_after_s == 1
    clock.now += 1  # 10 tokens back
    limiter.admit(key, 1)


def test_key_metric_labels_are_bounded() -> None:
    from prometheus_client import CollectorRegistry

    from tokenspout.server.key_metrics import MAX_LABELLED_KEYS, OTHER, KeyMetrics

    metrics = KeyMetrics(CollectorRegistry())
    for i in range(MAX_LABELLED_KEYS + 500):
        metrics.admitted(f"tenant-{i}")
    labels = {s.labels["key"] for s in next(iter(metrics.requests.collect())).samples}
    assert len(labels) == MAX_LABELLED_KEYS + 1 and OTHER in labels


def test_a_stream_that_fails_to_open_gives_its_key_slot_back() -> None:
    from tokenspout.engine.synthetic_engine import SyntheticEngine
    from tokenspout.server.config import ServerConfig
    from tokenspout.server.generation_request import prepare_completion
    from tokenspout.server.responder import open_stream
    from tokenspout.server.schemas import CompletionRequest
    from tokenspout.server.server_state import ServerState

    state = ServerState(SyntheticEngine(), ServerConfig())
    state.ready = True
    key = ApiKey("a", b"", max_concurrent_streams=1)
    generation = asyncio.run(prepare_completion(state, CompletionRequest(prompt="x")))

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("engine refused")

    state.streams.open = fail  # type: ignore[method-assign]
    for _ in range(2):  # a leaked slot would make the second a 429
        with pytest.raises(RuntimeError):
            asyncio.run(open_stream(state, generation, key))
