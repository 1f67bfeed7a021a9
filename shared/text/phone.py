"""Phone numbers: everything we store or send is E.164."""

from __future__ import annotations

import functools

import phonenumbers

# Parsing and validating a number costs tens of microseconds, more than the rest of an accept's
# checks together; the same callers and senders come back again and again.
_CACHED = 65_536


@functools.lru_cache(maxsize=_CACHED)
def to_e164(raw: str, default_region: str) -> str | None:
    """`+972 54 4696388` -> `+972544696388`; None when it is not a valid phone number."""
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@functools.lru_cache(maxsize=_CACHED)
def normalise_sender(raw: str, default_region: str) -> str:
    """A sender is a number (made E.164 when it parses) or an alphanumeric sender id (kept)."""
    stripped = raw.strip()
    if any(ch.isalpha() for ch in stripped):
        return stripped
    try:
        parsed = phonenumbers.parse(stripped, default_region)
    except phonenumbers.NumberParseException:
        return stripped
    # Short codes ("33669") are senders too: prefixing a country code would invent a number.
    if not stripped.startswith("+") and not phonenumbers.is_possible_number(parsed):
        return stripped
    # Long numbers are only formatted, not validated (test ranges fail strict validation);
    # the account's list of senders decides what is allowed.
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
