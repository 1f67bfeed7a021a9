"""Phone numbers: callers are stored and sent as E.164; senders are numbers or alphanumeric ids."""

from __future__ import annotations

import pytest

from shared.text.phone import NumberPool, normalise_sender, to_e164, to_e164_many


def test_international_number_with_spaces_becomes_e164() -> None:
    assert to_e164("+972 54 4696388", "US") == "+972544696388"


def test_international_number_ignores_the_default_region() -> None:
    assert to_e164("+972 54 4696388", "GB") == "+972544696388"


def test_punctuation_is_removed() -> None:
    assert to_e164("+1 (202) 555-0143", "US") == "+12025550143"


def test_national_number_is_read_in_the_default_region() -> None:
    assert to_e164("054-4696388", "IL") == "+972544696388"


def test_national_number_without_country_uses_us_region() -> None:
    assert to_e164("(202) 555-0143", "US") == "+12025550143"


def test_same_national_digits_mean_a_different_country_in_another_region() -> None:
    assert to_e164("054-4696388", "US") is None


@pytest.mark.parametrize(
    "raw",
    ["", "not a number", "12345", "+1 212 123", "+999 1234567", "+972 54 46963880000"],
)
def test_invalid_number_is_none(raw: str) -> None:
    assert to_e164(raw, "US") is None


def test_alphanumeric_sender_id_is_kept() -> None:
    assert normalise_sender("ACME", "US") == "ACME"


def test_alphanumeric_sender_id_keeps_its_case_and_punctuation() -> None:
    assert normalise_sender("Acme-1", "US") == "Acme-1"


def test_alphanumeric_sender_id_is_stripped_of_surrounding_blanks() -> None:
    assert normalise_sender("  ACME ", "US") == "ACME"


def test_sender_number_is_made_e164() -> None:
    assert normalise_sender("+1 (212) 123-4567", "US") == "+12121234567"


def test_national_sender_number_is_read_in_the_default_region() -> None:
    assert normalise_sender("(212) 123-4567", "US") == "+12121234567"


def test_sender_number_that_strict_validation_rejects_is_still_normalised() -> None:
    # 212-123-xxxx is not an assignable US number, yet senders are not validated, only formatted.
    assert to_e164("+12121234567", "US") is None
    assert normalise_sender("+1 212 123 4567", "US") == "+12121234567"


def test_same_sender_written_two_ways_normalises_to_the_same_value() -> None:
    assert normalise_sender("+12121234567", "US") == normalise_sender("212-123-4567", "US")


def test_short_code_sender_is_kept_as_digits() -> None:
    # A short code is not a phone number in any country: "+1" in front of it is a different,
    # non-existent sender that a provider would refuse.
    assert normalise_sender("12345", "US") == "12345"


NUMBERS: list[str | None] = [
    "+972 54 4696388",
    "(202) 555-0143",
    "not a number",
    None,
    "+1 202 555 0143",
    "+44 20 7946 0958",
]


def test_the_number_pool_answers_as_the_calling_thread_would() -> None:
    pool = NumberPool(1)
    try:
        pooled = pool.result(pool.submit(NUMBERS, "US"), NUMBERS, "US")
    finally:
        pool.close()
    assert pooled == to_e164_many(NUMBERS, "US")
    assert pooled == ["+972544696388", "+12025550143", None, None, "+12025550143", "+442079460958"]


def test_a_pool_whose_process_dies_is_replaced_and_the_chunk_still_checked() -> None:
    pool = NumberPool(1)
    try:
        pool.result(pool.submit(["+12025550143"], "US"), ["+12025550143"], "US")
        executor = pool._pool
        assert executor is not None
        for process in list(executor._processes.values()):  # the pool's own, for the test
            process.kill()
            process.join()
        # The next chunk is checked although the pool broke under it...
        broken = pool.submit(NUMBERS, "US")
        assert pool.result(broken, NUMBERS, "US") == to_e164_many(NUMBERS, "US")
        # ...and the one after goes to a new pool.
        again = pool.submit(NUMBERS, "US")
        assert pool.result(again, NUMBERS, "US") == to_e164_many(NUMBERS, "US")
        assert again.pool is not executor
    finally:
        pool.close()


def test_no_processes_means_the_calling_thread_checks() -> None:
    pool = NumberPool(0)
    checking = pool.submit(NUMBERS, "US")
    assert checking.pool is None
    assert checking.future.done()
    assert checking.future.result() == to_e164_many(NUMBERS, "US")
    assert pool._pool is None


def test_a_pool_shut_down_under_a_running_request_fails_its_chunks_over_to_the_request() -> None:
    pool = NumberPool(1)
    first = pool.submit(NUMBERS, "US")
    pool.close()  # the app stops while a bulk request is still storing
    assert pool.result(first, NUMBERS, "US") == to_e164_many(NUMBERS, "US")
    after = pool.submit(NUMBERS, "US")
    assert after.pool is None  # no new pool once closed
    assert pool.result(after, NUMBERS, "US") == to_e164_many(NUMBERS, "US")


def test_a_broken_pool_is_replaced_only_by_the_request_that_found_it_broken() -> None:
    pool = NumberPool(1)
    try:
        old = pool.submit(NUMBERS, "US")
        pool.result(old, NUMBERS, "US")
        assert old.pool is not None
        pool._drop(old.pool)  # another request found it broken and replaced it
        new = pool.submit(NUMBERS, "US")
        assert new.pool is not None
        assert new.pool is not old.pool
        pool._drop(old.pool)  # a late finding about the old pool leaves the new one alone
        assert pool.result(new, NUMBERS, "US") == to_e164_many(NUMBERS, "US")
        assert pool._pool is new.pool
    finally:
        pool.close()
