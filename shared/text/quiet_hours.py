"""Quiet hours: the local times of day a campaign sends no bulk texts, judged in the recipient's
own time zone, as their number tells it.

A number's zones come from phonenumbers: one for most numbers, several where a country spans
several (Australia) or where its prefix alone does not tell (the whole country's zones then,
e.g. every zone of +1 for a number phonenumbers cannot place). A message is held while it is
quiet time in any of its number's zones, so nobody is texted at night for want of knowing
where they are; a number whose zones are quiet around the clock together, or that has none, is
not held (there is no better time to wait for)."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_zones

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_quiet_hours(text: str) -> tuple[time, time]:
    """`HH:MM-HH:MM`, local: quiet from the first to the second (past midnight when the first
    is later, as in `21:00-08:00`); raises ValueError otherwise (an empty window too)."""
    found = _WINDOW.match(text.strip())
    if found is None:
        raise ValueError(f"quiet hours must be HH:MM-HH:MM, not {text!r}")
    start = time(int(found[1]), int(found[2]))
    end = time(int(found[3]), int(found[4]))
    if start == end:
        raise ValueError("quiet hours must not start and end at the same time")
    return start, end


@functools.lru_cache(maxsize=4096)
def zones_of(number: str) -> tuple[ZoneInfo, ...]:
    """The time zones a number (E.164) may be in; none when phonenumbers cannot tell."""
    try:
        parsed = phonenumbers.parse(number)
    except phonenumbers.NumberParseException:
        return ()
    names = number_zones.time_zones_for_number(parsed)
    if not names or number_zones.UNKNOWN_TIMEZONE in names:
        # The prefix does not place it: every zone of its country (a private helper of the
        # library's, the same lookup at country level).
        names = number_zones._country_level_time_zones_for_number(parsed)
    zones = []
    for name in names:
        if name == number_zones.UNKNOWN_TIMEZONE:
            continue
        try:
            zones.append(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return tuple(zones)


def quiet_until(number: str, window: tuple[time, time], now: datetime) -> datetime | None:
    """When a text to `number` may go, if it is quiet time for it at `now` (aware UTC); None
    when it may go now."""
    zones = zones_of(number)
    if not zones:
        return None
    moment = now
    # Each step moves to the end of the latest quiet time in force: a few zones need a few.
    for _ in range(len(zones) + 1):
        ends = [end for zone in zones if (end := _quiet_end(zone, window, moment)) is not None]
        if not ends:
            return moment if moment > now else None
        moment = max(ends)
        if moment - now >= timedelta(days=1):
            return None  # quiet around the clock across its zones: no better time to wait for
    return None


def _quiet_end(zone: ZoneInfo, window: tuple[time, time], moment: datetime) -> datetime | None:
    """The end of the quiet time in force in `zone` at `moment` (UTC), or None if none is."""
    start, end = window
    local = moment.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    if start < end:
        quiet = start <= clock < end
        ends_on = local.date()
    else:  # past midnight
        quiet = clock >= start or clock < end
        ends_on = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not quiet:
        return None
    return datetime.combine(ends_on, end, tzinfo=zone).astimezone(UTC)
