"""Quiet hours judged in the recipient's own time zone (shared/text/quiet_hours.py)."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from shared.text.quiet_hours import parse_quiet_hours, quiet_until, zones_of

NIGHT = (time(21, 0), time(8, 0))
ISRAEL = "+972544696388"  # Asia/Jerusalem, UTC+2 in December
# A mobile: every zone of +61, from the Cocos Islands (UTC+6:30) to Sydney (UTC+11 in December).
AUSTRALIA = "+61412345678"


def at(hour: int, minute: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC)


def test_a_window_is_two_local_times_and_nothing_else() -> None:
    assert parse_quiet_hours("21:00-08:00") == NIGHT
    assert parse_quiet_hours(" 13:30-14:15 ") == (time(13, 30), time(14, 15))
    for bad in ("21-8", "25:00-08:00", "21:00", "08:00-08:00", "9:00-10:00"):
        with pytest.raises(ValueError, match="quiet hours"):
            parse_quiet_hours(bad)


def test_at_night_in_the_recipients_zone_it_waits_for_the_morning_there() -> None:
    # 20:00 UTC is 22:00 in Jerusalem: held until 08:00 there, 06:00 UTC the next day.
    assert quiet_until(ISRAEL, NIGHT, at(20)) == at(6, day=2)
    # 03:00 UTC is 05:00 there: until 08:00 the same day.
    assert quiet_until(ISRAEL, NIGHT, at(3)) == at(6)
    # Noon UTC is 14:00 there: it goes now.
    assert quiet_until(ISRAEL, NIGHT, at(12)) is None


def test_a_window_within_one_day_holds_only_inside_it() -> None:
    lunch = parse_quiet_hours("12:00-14:00")  # local
    assert quiet_until(ISRAEL, lunch, at(10, 30)) == at(12)  # 12:30 there: until 14:00 there
    assert quiet_until(ISRAEL, lunch, at(12)) is None  # 14:00 there: over


def test_a_number_of_several_zones_waits_until_it_is_day_in_all_of_them() -> None:
    assert len(zones_of(AUSTRALIA)) > 1
    # 12:00 UTC: 18:30 on Cocos but 23:00 in Sydney: quiet in one, so held until the last of
    # them wakes: 08:00 on Cocos (UTC+6:30) is 01:30 UTC.
    until = quiet_until(AUSTRALIA, NIGHT, at(12))
    assert until is not None
    assert until == at(1, 30, day=2)
    assert quiet_until(AUSTRALIA, NIGHT, until) is None


def test_a_number_with_no_known_zone_is_not_held() -> None:
    assert zones_of("not a number") == ()
    assert quiet_until("not a number", NIGHT, at(20)) is None
