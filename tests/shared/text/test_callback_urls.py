"""Which statusCallback URLs are refused, and why: the SSRF rules."""

from __future__ import annotations

import ipaddress

import pytest

from shared.text.callback_urls import (
    allowed_networks,
    parse_callback_url,
    refused_address,
    refused_url,
    shown_url,
)

NOTHING_ALLOWED = allowed_networks("")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not global"),  # carrier-grade NAT, shared address space
    ],
)
def test_addresses_that_are_not_globally_routable_are_refused(address: str, reason: str) -> None:
    assert refused_address(ipaddress.ip_address(address), NOTHING_ALLOWED) == reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert refused_address(ipaddress.ip_address(address), NOTHING_ALLOWED) is None


def test_an_operator_allowed_network_lets_its_addresses_through_and_no_others() -> None:
    allowed = allowed_networks("10.0.0.0/8, 127.0.0.1/32")
    assert refused_address(ipaddress.ip_address("10.9.9.9"), allowed) is None
    assert refused_address(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert refused_address(ipaddress.ip_address("127.0.0.2"), allowed) == "loopback"
    assert refused_address(ipaddress.ip_address("192.168.0.1"), allowed) == "private"


def test_a_malformed_allowed_network_is_an_error_not_ignored() -> None:
    with pytest.raises(ValueError, match="does not appear"):
        allowed_networks("10.0.0.0/8,not-a-network")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "example.com/status",
        "https:///status",
        "https://example.com:0/x",
        "https://example.com:99999/x",
        "https://exa mple.com/x",
        "https://example.com/\nx",
        "https://example.com/" + "a" * 2048,
    ],
)
def test_urls_that_are_not_absolute_http_are_refused(url: str) -> None:
    assert parse_callback_url(url) is None
    assert refused_url(url, NOTHING_ALLOWED) == "not an absolute http or https URL"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://[::1]/x",
        "http://localhost/x",
        "http://LOCALHOST./x",
        "http://api.localhost/x",
        "http://169.254.169.254/latest/meta-data/",
        "https://user:pw@10.0.0.5/hook",
    ],
)
def test_literal_internal_addresses_and_localhost_are_refused_when_accepted(url: str) -> None:
    assert refused_url(url, NOTHING_ALLOWED) is not None


def test_names_and_public_literals_are_accepted_and_left_to_delivery_to_resolve() -> None:
    assert refused_url("https://hooks.example.com/sms?x=1", NOTHING_ALLOWED) is None
    assert refused_url("http://93.184.216.34:8080/sms", NOTHING_ALLOWED) is None
    assert refused_url("http://127.0.0.1:9/x", allowed_networks("127.0.0.0/8")) is None


def test_a_password_in_a_url_is_never_shown() -> None:
    assert shown_url("https://bob:s3cret@hooks.example.com/x") == (
        "https://bob:***@hooks.example.com/x"
    )
    assert shown_url("https://hooks.example.com/x") == "https://hooks.example.com/x"


@pytest.mark.parametrize(
    ("address", "reason"),
    [("2002:7f00:1::1", "loopback"), ("2002:a00:1::1", "private"), ("fec0::1", "site-local")],
)
def test_ipv6_forms_that_reach_inside_are_refused(address: str, reason: str) -> None:
    assert refused_address(ipaddress.ip_address(address), NOTHING_ALLOWED) == reason


@pytest.mark.parametrize(
    "url",
    ["http://bücher.example/x", "http://☃.example.com/", "http://exa%6dple.com/", "http://a..b/"],
)
def test_a_host_that_is_not_a_dns_name_on_the_wire_is_refused(url: str) -> None:
    assert parse_callback_url(url) is None


def test_an_international_name_in_its_xn_form_is_accepted() -> None:
    assert parse_callback_url("https://xn--bcher-kva.example/x") is not None
