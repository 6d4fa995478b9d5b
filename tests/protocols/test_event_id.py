"""Event ids: a stream and a position, parsed back or refused in words."""

from __future__ import annotations

import pytest

from tokenspout.protocols.event_id import EventPosition, format_event_id, parse_event_id


def test_an_id_parses_back_to_its_position() -> None:
    assert parse_event_id(format_event_id("abc", 12)) == EventPosition("abc", 12, 0)
    assert parse_event_id(format_event_id("abc", 12, 2)) == EventPosition("abc", 12, 2)


@pytest.mark.parametrize("value", ["abc", "abc:", ":3", "abc:x", "abc:1.", "abc:" + "9" * 5000])
def test_a_malformed_id_is_refused_in_words(value: str) -> None:
    with pytest.raises(ValueError, match="is not of the form") as info:
        parse_event_id(value)
    assert "sys.set_int_max_str_digits" not in str(info.value)
