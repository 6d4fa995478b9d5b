"""Limits on request fields whose size a client chooses and the server pays for on every
token: the ``stop`` list (each string is searched for in the output as it grows)."""

from __future__ import annotations

from tokenspout.errors import InvalidRequestError
from tokenspout.server.config import ServerConfig


def check_stop(config: ServerConfig, stops: tuple[str, ...]) -> None:
    if len(stops) > config.max_stop_strings:
        raise InvalidRequestError(
            f"stop: {len(stops)} strings; this server allows at most {config.max_stop_strings}",
            param="stop",
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > config.max_stop_chars:
        raise InvalidRequestError(
            f"stop: a string of {longest} characters; this server allows at most "
            f"{config.max_stop_chars}",
            param="stop",
        )
