"""API keys: the single ``--api-key`` and the keys of ``--api-keys-file`` (TOML).

The file is the shape other tools write::

    [[keys]]
    name = "alice"                      # shown in metrics and logs, never the secret
    key = "sk-alice-..."                # or: key_sha256 = "<hex of the key's SHA-256>"
    max_concurrent_streams = 2          # optional, each of these four
    requests_per_minute = 60
    tokens_per_minute = 100000          # prompt + completion
    models = ["SmolLM2-135M-Instruct"]  # allowed models; absent = all

Keys are held as SHA-256 digests only. A presented key is hashed, looked up in a dict by its
digest and compared with ``hmac.compare_digest``: the time taken does not depend on how much
of a stored secret a guess shares. ``reload()`` (on SIGHUP) swaps the whole table at once;
a file that does not parse keeps the old table and logs why.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("tokenspout")

#: The name the single ``--api-key`` has in metrics, logs and stream ownership.
SINGLE_KEY_NAME = "default"
_MAX_NAME_CHARS = 64
_LIMIT_FIELDS = ("max_concurrent_streams", "requests_per_minute", "tokens_per_minute")
_FIELDS = {"name", "key", "key_sha256", "models", *_LIMIT_FIELDS}


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where and why, on one line."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key: its name, the SHA-256 of its secret, its limits (None: unlimited)."""

    name: str
    sha256: bytes
    max_concurrent_streams: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    #: Model names this key may use; None: every served model.
    models: frozenset[str] | None = None


def digest(secret: str) -> bytes:
    # surrogatepass: a header or query value that is not valid text still hashes (to a
    # digest no key has) instead of raising.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _entry(i: int, raw: Any) -> ApiKey:
    where = f"keys[{i}]"
    if not isinstance(raw, dict):
        raise KeysFileError(f"{where} must be a table ([[keys]])")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise KeysFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_CHARS:
        raise KeysFileError(f"{where}.name must be a string of 1 to {_MAX_NAME_CHARS} characters")
    where = f"key {name!r}"
    if ("key" in raw) == ("key_sha256" in raw):
        raise KeysFileError(f"{where} needs exactly one of key or key_sha256")
    if "key" in raw:
        secret = raw["key"]
        if not isinstance(secret, str) or not secret:
            raise KeysFileError(f"{where}: key must be a non-empty string")
        if secret != secret.strip():
            # A bearer token is read without its surrounding spaces: such a key could
            # never authenticate.
            raise KeysFileError(f"{where}: key begins or ends with whitespace")
        sha = digest(secret)
    else:
        hexed = raw["key_sha256"]
        if (
            not isinstance(hexed, str)
            or len(hexed) != 64
            or not set(hexed.lower()) <= set(string.hexdigits.lower())
        ):
            raise KeysFileError(f"{where}: key_sha256 must be 64 hex digits")
        sha = bytes.fromhex(hexed)
    limits: dict[str, int] = {}
    for field in _LIMIT_FIELDS:
        if field in raw:
            value = raw[field]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KeysFileError(f"{where}: {field} must be an integer >= 1")
            limits[field] = value
    models = None
    if "models" in raw:
        listed = raw["models"]
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise KeysFileError(f"{where}: models must be a list of model names")
        models = frozenset(listed)
    return ApiKey(name, sha, models=models, **limits)


def load_keys_file(path: str | Path) -> list[ApiKey]:
    """Every key of the file, checked; raises ``KeysFileError``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise KeysFileError(f"keys file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"keys file {path}: not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"keys"})
    if extra:
        raise KeysFileError(f"keys file {path}: unknown top-level entries {', '.join(extra)}")
    raw_keys = data.get("keys", [])
    if not isinstance(raw_keys, list):
        raise KeysFileError(f"keys file {path}: keys must be an array of tables ([[keys]])")
    try:
        return [_entry(i, raw) for i, raw in enumerate(raw_keys)]
    except KeysFileError as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from None


class KeyStore:
    """The keys a server accepts. Empty (no ``--api-key``, no file): auth is off."""

    def __init__(self, single_key: str | None = None, keys_file: str | Path | None = None):
        self._single = None if single_key is None else ApiKey(SINGLE_KEY_NAME, digest(single_key))
        self._file = keys_file
        self._by_hash: dict[bytes, ApiKey] = {}
        self._install(load_keys_file(keys_file) if keys_file is not None else [])

    @property
    def enabled(self) -> bool:
        """Keys are required: set once at start, whatever a reload finds in the file."""
        return self._single is not None or self._file is not None

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The key whose secret this is, or None."""
        if not secret:
            return None
        presented = digest(secret)
        found = self._by_hash.get(presented)
        if found is None or not hmac.compare_digest(found.sha256, presented):
            return None
        return found

    def named(self, name: str) -> ApiKey | None:
        """The key of this name in use now, if any."""
        return next((k for k in self._by_hash.values() if k.name == name), None)

    def current(self, key: ApiKey) -> ApiKey | None:
        """``key`` as the keys now in use have it (its limits may have changed on a
        reload), or None once it was revoked."""
        found = self._by_hash.get(key.sha256)
        return found if found is not None and found.name == key.name else None

    def reload(self) -> bool:
        """Read the keys file again; on any error keep the keys in use and log why."""
        if self._file is None:
            logger.info("nothing to reload (no --api-keys-file); ignored")
            return False
        try:
            self._install(load_keys_file(self._file))
        except KeysFileError as exc:
            logger.error("keys file not reloaded, the previous keys stay in use: %s", exc)
            return False
        logger.info("keys file reloaded: %d key(s)", len(self._by_hash))
        return True

    def _install(self, keys: list[ApiKey]) -> None:
        table: dict[bytes, ApiKey] = {}
        names: set[str] = set()
        for key in [*([self._single] if self._single else []), *keys]:
            if key.name in names:
                raise KeysFileError(f"keys file {self._file}: the name {key.name!r} is used twice")
            if key.sha256 in table:
                raise KeysFileError(
                    f"keys file {self._file}: keys {table[key.sha256].name!r} and "
                    f"{key.name!r} have the same secret"
                )
            names.add(key.name)
            table[key.sha256] = key
        # One assignment: a request sees the old table or the new one, never a mix.
        self._by_hash = table
