"""Turning a campaign into the text of one SMS."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

LINK_PLACEHOLDER = "<link>"


def parse_additional_params(raw: str) -> list[tuple[str, str]] | None:
    """`var1=value1&var2=value` as pairs; None when it is not a query string."""
    try:
        return parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None


def build_link(link_url: str, params: list[tuple[str, str]], jp_token: str | None) -> str:
    """The campaign link with the caller's parameters and, for reporting, the call's token."""
    parts = urlsplit(link_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend(params)
    if jp_token:
        # How a click on the SMS link is tied back to the call in the deflection report.
        query.append(("startedFromSmsToken", jp_token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def render_text(message_text: str, link: str | None) -> str:
    """The campaign text with `<link>` replaced; a text without the placeholder is sent as is."""
    return message_text.replace(LINK_PLACEHOLDER, link or "")
