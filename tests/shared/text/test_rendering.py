"""Turning a campaign into SMS text: the link, the caller's parameters, the call's token."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from shared.text.rendering import build_link, parse_additional_params, render_text

CAMPAIGN_LINK = "https://flows.example.com/start?lang=en"


def test_build_link_appends_params_to_an_existing_query() -> None:
    link = build_link(CAMPAIGN_LINK, [("var1", "value1")], None)
    assert link == "https://flows.example.com/start?lang=en&var1=value1"


def test_build_link_keeps_the_order_of_existing_then_given_params() -> None:
    link = build_link(CAMPAIGN_LINK, [("z", "1"), ("a", "2"), ("m", "3")], None)
    assert parse_qsl(urlsplit(link).query) == [("lang", "en"), ("z", "1"), ("a", "2"), ("m", "3")]


def test_build_link_adds_started_from_sms_token_last() -> None:
    link = build_link(CAMPAIGN_LINK, [("var1", "value1")], "Aejhib7")
    assert link == "https://flows.example.com/start?lang=en&var1=value1&startedFromSmsToken=Aejhib7"


def test_build_link_without_token_has_no_started_from_sms_token() -> None:
    assert "startedFromSmsToken" not in build_link(CAMPAIGN_LINK, [], None)


def test_build_link_on_a_link_without_query_starts_one() -> None:
    link = build_link("https://flows.example.com/start", [("a", "1")], "Tok1234")
    assert link == "https://flows.example.com/start?a=1&startedFromSmsToken=Tok1234"


def test_build_link_keeps_scheme_host_path_and_fragment() -> None:
    link = build_link("https://flows.example.com/a/b?lang=en#step2", [("x", "1")], None)
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == (
        "https",
        "flows.example.com",
        "/a/b",
        "step2",
    )


def test_build_link_encodes_param_values() -> None:
    link = build_link(CAMPAIGN_LINK, [("q", "a b&c=d")], None)
    assert parse_qsl(urlsplit(link).query) == [("lang", "en"), ("q", "a b&c=d")]
    assert "a b" not in link


def test_parse_additional_params_returns_pairs_in_order() -> None:
    assert parse_additional_params("var1=value1&var2=value") == [
        ("var1", "value1"),
        ("var2", "value"),
    ]


def test_parse_additional_params_keeps_blank_values() -> None:
    assert parse_additional_params("a=&b=2") == [("a", ""), ("b", "2")]


def test_parse_additional_params_decodes_percent_escapes() -> None:
    assert parse_additional_params("name=J%C3%BCrgen+M") == [("name", "Jürgen M")]


@pytest.mark.parametrize("raw", ["garbage", "a=1&&b=2", "&", "a=1&b", "a=1;b=2x&c"])
def test_parse_additional_params_rejects_garbage(raw: str) -> None:
    assert parse_additional_params(raw) is None


def test_render_text_replaces_the_link_placeholder() -> None:
    assert render_text("Please click here <link>", "https://x.example/a?b=1") == (
        "Please click here https://x.example/a?b=1"
    )


def test_render_text_replaces_every_placeholder() -> None:
    assert render_text("<link> or <link>", "https://x.example") == (
        "https://x.example or https://x.example"
    )


def test_render_text_without_placeholder_is_sent_as_is() -> None:
    assert render_text("Call us back", "https://x.example") == "Call us back"


def test_render_text_without_link_drops_the_placeholder() -> None:
    assert render_text("Hello <link>", None) == "Hello "
