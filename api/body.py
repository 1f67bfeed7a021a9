"""Reading a JSON request body ourselves, so a bad field is named the way the seed names it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import structlog

log = structlog.get_logger(__name__)


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class JsonBody:
    """A request body as a JSON object; the first unusable field is kept in `invalid`."""

    def __init__(self, raw: bytes) -> None:
        self.invalid: str | None = None
        self._data: dict[str, Any] = {}
        if not raw.strip():
            return  # an empty body is an empty object: the fields then say what is missing
        try:
            decoded = msgspec.json.decode(raw)
        # Besides malformed JSON (numbers out of range included), msgspec raises
        # UnicodeDecodeError for invalid UTF-8 and RecursionError for deep nesting.
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("request.unreadable_body", error=type(exc).__name__, size=len(raw))
            self.invalid = "body"
            return
        if isinstance(decoded, dict):
            self._data = decoded
        else:
            self.invalid = "body"

    @classmethod
    def of(cls, decoded: object) -> JsonBody:
        """A body already decoded (one row of a bulk request): an object, or `body` invalid."""
        body = cls(b"")
        if isinstance(decoded, dict):
            body._data = decoded
        else:
            body.invalid = "body"
        return body

    def text(self, name: str, *, allow_number: bool = False) -> str | None:
        """A string field, or None when absent or blank (an invalid type marks it invalid)."""
        value = self._data.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            if "\x00" in value or not _is_utf8(value):
                # No database stores a NUL, and no caller means it; a lone surrogate (a row
                # of a bulk body, read by the json module) cannot be stored or sent either.
                self._mark(name)
                return None
            return value.strip() or None
        # Some IVRs send phone numbers as JSON numbers; reading them is friendlier than a 400.
        if allow_number and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        self._mark(name)
        return None

    def flag(self, name: str) -> bool:
        """A boolean field; `"true"`/`"false"` strings are read too (absent means false)."""
        value = self._data.get(name)
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        self._mark(name)
        return False

    def timestamp(self, name: str) -> datetime | None:
        """An RFC 3339 date and time with its offset (`2026-12-24T09:00:00+01:00`, or `Z`),
        or None when absent; one without an offset is invalid (whose 09:00 would it be?)."""
        text = self.text(name)
        if text is None:
            return None
        moment = rfc3339(text)
        if moment is None:
            self._mark(name)
        return moment

    def integer(self, name: str) -> int | None:
        value = self._data.get(name)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self._mark(name)
        return None

    def _mark(self, name: str) -> None:
        if self.invalid is None:
            self.invalid = name


def rfc3339(text: str) -> datetime | None:
    """An RFC 3339 date and time with an offset, or None (a date alone, no offset, not one)."""
    if "T" not in text.upper() or len(text) > 64:
        return None
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
