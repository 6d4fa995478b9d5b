"""JSON from a client, parsed with limits: nesting depth, and text that is valid Unicode.

``json.loads`` accepts ``"\\ud800"`` (an escaped lone surrogate) and gives a ``str`` that
cannot be encoded: it failed deep in a tokenizer (500) or hung an engine. It also recurses
once per nesting level, so ``[[[[...`` a hundred thousand deep was a ``RecursionError``
(500). Both are refused here, at parse time, with a message that names the field.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tokenspout.errors import InvalidRequestError, field_path

DEFAULT_MAX_DEPTH = 32


def _field(path: list[str | int]) -> str:
    return field_path(path) or "body"


def _valid_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_value(data: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise ``InvalidRequestError`` for nesting deeper than ``max_depth`` or a string (or
    object key) holding a lone surrogate, naming where. Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _valid_text(value):
                where = _field(path)
                raise InvalidRequestError(
                    f"{where}: text contains a lone surrogate (such as \\ud800); "
                    "send valid Unicode",
                    param=where,
                )
            continue
        if not isinstance(value, dict | list):
            continue
        if len(path) >= max_depth:
            raise InvalidRequestError(
                f"{_field(path)}: JSON is nested deeper than {max_depth} levels",
                param=_field(path),
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not _valid_text(key):
                    raise InvalidRequestError(
                        f"{_field(path)}: an object key contains a lone surrogate",
                        param=_field(path),
                    )
                stack.append((item, [*path, key]))
        else:
            stack.extend((item, [*path, i]) for i, item in enumerate(value))


class _NotJson(ValueError):
    pass


def _not_json(name: str) -> Any:
    # Python's json takes NaN and Infinity, which JSON (RFC 8259) does not have: a NaN
    # temperature was refused as "should be less than or equal to 2".
    raise _NotJson(f"{name} is not a JSON value")


def parse(raw: str | bytes, what: str) -> Any:
    """``json.loads``, its failures as ``InvalidRequestError`` (``what``: body or message)."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError, _NotJson) as exc:
        raise InvalidRequestError(f"{what} is not valid JSON: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts
        # Python's own message advises sys.set_int_max_str_digits(), meaningless to a client.
        raise InvalidRequestError(
            f"{what} holds an integer literal too long to read "
            f"(over {sys.get_int_max_str_digits()} digits)"
        ) from None
    except RecursionError:
        raise InvalidRequestError(f"{what}: JSON is nested too deeply") from None


def loads(raw: str | bytes, what: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse ``raw`` (a request body or a message: ``what`` says which) and check it."""
    data = parse(raw, what)
    check_value(data, max_depth)
    return data
