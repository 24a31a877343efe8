"""E.164 numbers as config stores and compares them.

One normalization for everything that names a number (the admin API, inbound routing, outbound
calls), so ``+1 (415) 555-0100`` typed by an admin and ``+14155550100`` sent by a carrier are the
same row. Only the separators people type are removed; anything else that is not a digit is an
error, never silently dropped.
"""

from __future__ import annotations

import re

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")  # [0-9], not \d: \d also matches non-ASCII digits
_DIGITS = re.compile(r"^[0-9]+$")
_SEPARATORS = re.compile(r"[\s\-()]")
MAX_SHOWN = 40  # a long garbage value is cut in messages, never echoed whole


class InvalidNumber(ValueError):
    pass


def normalize_e164(value: str) -> str:
    """``value`` without spaces, dashes and parentheses, if that is E.164; else :class:`InvalidNumber`."""
    number = _SEPARATORS.sub("", value)
    if E164.match(number):
        return number
    shown = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "…"
    if not number.startswith("+"):
        why = "it must start with + and the country code"
    elif not _DIGITS.match(number[1:]):
        why = "only digits may follow the + (spaces, dashes and parentheses are removed)"
    elif number[1:2] == "0":
        why = "the country code cannot start with 0"
    else:
        why = f"it has {len(number) - 1} digits; E.164 has 7 to 15"
    raise InvalidNumber(f"{shown!r} is not an E.164 number such as +14155550100: {why}")
