"""Turning a campaign into the text of one SMS."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

LINK_PLACEHOLDER = "<link>"
TOKEN_PARAMETER = "startedFromSmsToken"  # noqa: S105 - a URL parameter name, not a secret


def parse_additional_params(raw: str) -> list[tuple[str, str]] | None:
    """`var1=value1&var2=value` as pairs; None when it is not a query string."""
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    # `=x` parses, but a parameter without a name is a typo, not something to put in a link.
    return pairs if all(name for name, _ in pairs) else None


def build_link(link_url: str, params: list[tuple[str, str]], jp_token: str | None) -> str:
    """The campaign link with the caller's parameters and, for reporting, the call's token.

    The campaign's own query string is kept byte for byte; only what we add is encoded."""
    parts = urlsplit(link_url)
    own = [piece for piece in parts.query.split("&") if piece]
    if jp_token:
        # How a click on the SMS link is tied back to the call in the deflection report; a
        # value already in the link or the caller's parameters must not shadow the real one.
        own = [piece for piece in own if _name(piece) != TOKEN_PARAMETER]
        params = [(name, value) for name, value in params if name != TOKEN_PARAMETER]
        params.append((TOKEN_PARAMETER, jp_token))
    added = urlencode(params)
    query = "&".join([*own, added] if added else own)
    return urlunsplit(parts._replace(query=query))


def _name(piece: str) -> str:
    return unquote_plus(piece.partition("=")[0])


def render_text(message_text: str, link: str | None) -> str:
    """The campaign text with `<link>` replaced; a text without the placeholder is sent as is."""
    return message_text.replace(LINK_PLACEHOLDER, link or "")
