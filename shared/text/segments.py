"""How long an SMS is on the air: its encoding, its length in that encoding, and its segments.

A carrier bills, and a handset reassembles, per segment, so the accept path measures every
rendered body once and refuses the ones longer than the campaign allows.

- GSM-7 (3GPP TS 23.038, the "GSM 03.38" default alphabet) when every character is in the
  basic table or its extension table; an extension character is sent as ESC + its code, so it
  costs 2 septets.
- UCS-2 otherwise: one unexpected character switches the *whole* message. Counted in UTF-16
  code units, because that is what handsets actually decode (UCS-2 in name only): a character
  outside the Basic Multilingual Plane, an emoji say, is a surrogate pair of 2 units.

A single SMS carries 140 octets: 160 septets or 70 UTF-16 units. Concatenated parts spend 6
octets on the user-data header, leaving 153 septets or 67 units each. A part must end on a
character boundary: an ESC pair or a surrogate pair split across parts would be garbled by the
handset, so such a character moves whole to the next part and the previous one ends short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

Encoding = Literal["gsm7", "ucs2"]

# The basic table in code order 0x00-0x7F; 0x1B is ESC (the escape to the extension table),
# not a character, so it is left out. Written out in full so it can be checked against the
# standard row by row: note 0x24 is "¤" (not "$", which is 0x02) and 0x40 is "¡" (not "@").
_BASIC_TABLE: Final = (
    "@£$¥èéùìòÇ\nØø\rÅå"  # 0x00-0x0F
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"  # 0x10-0x1F, without ESC at 0x1B
    " !\"#¤%&'()*+,-./"  # 0x20-0x2F
    "0123456789:;<=>?"  # 0x30-0x3F
    "¡ABCDEFGHIJKLMNO"  # 0x40-0x4F
    "PQRSTUVWXYZÄÖÑÜ§"  # 0x50-0x5F
    "¿abcdefghijklmno"  # 0x60-0x6F
    "pqrstuvwxyzäöñüà"  # 0x70-0x7F
)
# The extension table's characters (each sent as ESC + code): form feed, ^ { } \ [ ~ ] | €.
_EXTENSION_TABLE: Final = "\f^{}\\[~]|€"

GSM7_BASIC: Final = frozenset(_BASIC_TABLE)
GSM7_EXTENSION: Final = frozenset(_EXTENSION_TABLE)

GSM7_SINGLE: Final = 160
GSM7_PART: Final = 153
UCS2_SINGLE: Final = 70
UCS2_PART: Final = 67


@dataclass(frozen=True, slots=True)
class Measure:
    encoding: Encoding
    # Septets for GSM-7, UTF-16 code units for UCS-2: what the segment sizes are counted in.
    units: int
    segments: int


def measure(text: str) -> Measure:
    """The encoding a text is sent in, its length in that encoding's units, and its segments."""
    gsm_costs = _gsm7_costs(text)
    if gsm_costs is not None:
        return Measure("gsm7", sum(gsm_costs), _segments(gsm_costs, GSM7_SINGLE, GSM7_PART))
    # A code point above U+FFFF is a surrogate pair in UTF-16. Counted per code point rather
    # than by encoding, so a lone surrogate (which JSON can smuggle in) cannot make this raise.
    ucs2_costs = [2 if ord(char) > 0xFFFF else 1 for char in text]
    return Measure("ucs2", sum(ucs2_costs), _segments(ucs2_costs, UCS2_SINGLE, UCS2_PART))


def _gsm7_costs(text: str) -> list[int] | None:
    """Septets per character, or None when a character has no GSM-7 code at all."""
    costs: list[int] = []
    for char in text:
        if char in GSM7_BASIC:
            costs.append(1)
        elif char in GSM7_EXTENSION:
            costs.append(2)
        else:
            return None
    return costs


def _segments(costs: Sequence[int], single: int, part: int) -> int:
    """How many segments characters of these costs take, never splitting one across parts."""
    if sum(costs) <= single:
        return 1  # the empty text too: it is still one (empty) SMS
    parts, used = 1, 0
    for cost in costs:
        if used + cost > part:
            parts, used = parts + 1, 0
        used += cost
    return parts
