"""Measuring an SMS: GSM-7 or UCS-2, its length in septets or UTF-16 units, its segments."""

from __future__ import annotations

import dataclasses

import pytest

from shared.text.segments import Measure, measure

# Every character of the GSM 03.38 basic table (ESC aside) and of its extension table.
BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
EXTENSION = "\f^{}\\[~]|€"
EMOJI = "😀"  # U+1F600: a surrogate pair in UTF-16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", Measure("gsm7", 0, 1), id="empty is one segment"),
        pytest.param("a", Measure("gsm7", 1, 1), id="one character"),
        # GSM-7: 160 in one SMS, 153 per part once concatenated.
        pytest.param("a" * 160, Measure("gsm7", 160, 1), id="160 GSM fits one"),
        pytest.param("a" * 161, Measure("gsm7", 161, 2), id="161 GSM is two"),
        pytest.param("a" * 306, Measure("gsm7", 306, 2), id="306 GSM is two"),
        pytest.param("a" * 307, Measure("gsm7", 307, 3), id="307 GSM is three"),
        pytest.param("a" * 459, Measure("gsm7", 459, 3), id="459 GSM is three"),
        pytest.param("a" * 460, Measure("gsm7", 460, 4), id="460 GSM is four"),
        # Extension characters cost two septets.
        pytest.param("€", Measure("gsm7", 2, 1), id="euro is two septets"),
        pytest.param("a" * 134 + "€" * 10, Measure("gsm7", 154, 1), id="134 + 10 euro fits one"),
        pytest.param("a" * 140 + "€" * 10, Measure("gsm7", 160, 1), id="140 + 10 euro is 160"),
        pytest.param("a" * 141 + "€" * 10, Measure("gsm7", 161, 2), id="141 + 10 euro is two"),
        pytest.param("€" * 80, Measure("gsm7", 160, 1), id="80 euro fit one"),
        pytest.param("€" * 81, Measure("gsm7", 162, 2), id="81 euro are two"),
        pytest.param("€" * 152, Measure("gsm7", 304, 2), id="152 euro: 76 a part, two"),
        pytest.param("€" * 153, Measure("gsm7", 306, 3), id="153 euro: 306 septets, three"),
        # Accented letters in the basic table keep GSM-7; one outside it switches everything.
        pytest.param("é" + "a" * 159, Measure("gsm7", 160, 1), id="e-acute stays GSM-7"),
        pytest.param("Ç", Measure("gsm7", 1, 1), id="capital C-cedilla is GSM-7"),
        pytest.param("ç", Measure("ucs2", 1, 1), id="small c-cedilla is not"),
        pytest.param("á", Measure("ucs2", 1, 1), id="a-acute is not GSM-7"),
        pytest.param("`", Measure("ucs2", 1, 1), id="backtick is not GSM-7"),
        pytest.param("\t", Measure("ucs2", 1, 1), id="tab is not GSM-7"),
        pytest.param("\x1b", Measure("ucs2", 1, 1), id="a bare ESC is not a character"),
        pytest.param("ą" + "a" * 159, Measure("ucs2", 160, 3), id="one a-ogonek makes UCS-2"),
        pytest.param(EMOJI + "a" * 10, Measure("ucs2", 12, 1), id="an emoji makes UCS-2"),
        pytest.param("ą€", Measure("ucs2", 2, 1), id="euro is one unit in UCS-2"),
        # UCS-2: 70 in one SMS, 67 per part.
        pytest.param("ą" * 70, Measure("ucs2", 70, 1), id="70 UCS-2 fits one"),
        pytest.param("ą" * 71, Measure("ucs2", 71, 2), id="71 UCS-2 is two"),
        pytest.param("ą" * 134, Measure("ucs2", 134, 2), id="134 UCS-2 is two"),
        pytest.param("ą" * 135, Measure("ucs2", 135, 3), id="135 UCS-2 is three"),
        pytest.param(EMOJI, Measure("ucs2", 2, 1), id="an emoji is two units"),
        pytest.param(EMOJI * 35, Measure("ucs2", 70, 1), id="35 emoji fit one"),
        pytest.param(EMOJI * 36, Measure("ucs2", 72, 2), id="36 emoji are two"),
        pytest.param(EMOJI * 67, Measure("ucs2", 134, 3), id="67 emoji: 33 a part, so three"),
        # An ESC pair never straddles two parts: it moves whole to the next one.
        pytest.param(
            "a" * 151 + "€" + "a" * 153, Measure("gsm7", 306, 2), id="escape pair ends part one"
        ),
        pytest.param(
            "a" * 152 + "€" + "a" * 152, Measure("gsm7", 306, 3), id="escape pair at 153 moves on"
        ),
        # Likewise a surrogate pair at the 67-unit boundary.
        pytest.param(
            "ą" + "a" * 64 + EMOJI + "a" * 67, Measure("ucs2", 134, 2), id="pair ends part one"
        ),
        pytest.param(
            "ą" + "a" * 65 + EMOJI + "a" * 66, Measure("ucs2", 134, 3), id="pair at 67 moves on"
        ),
        # A lone surrogate (JSON can carry one) is measured, not a crash.
        pytest.param("\ud83d", Measure("ucs2", 1, 1), id="lone surrogate"),
    ],
)
def test_measure(text: str, expected: Measure) -> None:
    assert measure(text) == expected


def test_the_whole_basic_table_is_gsm7_one_septet_each() -> None:
    assert len(BASIC) == 127  # 128 codes, less ESC
    assert measure(BASIC) == Measure("gsm7", 127, 1)


@pytest.mark.parametrize("char", list(EXTENSION))
def test_every_extension_character_is_gsm7_two_septets(char: str) -> None:
    assert measure(char) == Measure("gsm7", 2, 1)
    assert measure(BASIC + char).encoding == "gsm7"


def test_only_the_extension_table_is_counted_twice() -> None:
    assert measure(BASIC + EXTENSION).units == 127 + 2 * 10


def test_a_measure_cannot_be_changed() -> None:
    size = measure("hello")
    with pytest.raises(dataclasses.FrozenInstanceError):
        size.segments = 5  # type: ignore[misc]
