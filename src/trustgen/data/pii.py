"""Personal data in text: e-mail addresses, phone numbers, payment cards, IP addresses, IBANs.

Each kind is a detector: a candidate regular expression, a validator (the Luhn check for cards,
ISO 13616's mod-97 check for IBANs, the address parsers for IPs) and bounds for streaming. Data
preparation scrubs a corpus with `scrub_pii` before training; the content policy
(trustgen.safety.policy) runs the same detectors over prompts and generated streams.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trustgen.errors import TrustgenError

ALL_KINDS = ("email", "phone", "card", "ipv4", "ipv6", "iban")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "ipv4": "[IP]",
                "ipv6": "[IP]", "iban": "[IBAN]"}
# A streaming decision at position s is final once two characters past its longest reach are
# known: one for a look-ahead, one for `$`, which also matches just before a final newline.
MARGIN = 2


@dataclass(frozen=True)
class Match:
    """One PII match: its kind, its span in the text, and the matched text."""

    kind: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Detector:
    """A PII kind. `candidate` finds plausible spans and `accept` checks one, returning the end
    of the accepted match or None; every character of a match is in `alphabet`, and no match
    with its look-ahead reaches more than `reach` characters from its start."""

    kind: str
    candidate: re.Pattern[str]
    accept: Callable[[re.Match[str]], int | None]
    alphabet: re.Pattern[str]
    reach: int

    def search(self, text: str, pos: int) -> tuple[int, int] | None:
        while (m := self.candidate.search(text, pos)) is not None:
            end = self.accept(m)
            if end is not None:
                return m.start(), end
            # Retry from the next character, not from the candidate's end, so whether a match
            # starts at a position never depends on where the search began.
            pos = m.start() + 1
        return None

    def frontier(self, text: str, pos: int) -> int:
        # A match starting at or before a character outside the alphabet ends before it, so it
        # is decided; so is one starting more than `reach` characters before the end.
        settled = max(pos, len(text) - self.reach - MARGIN)
        for i in range(len(text) - 1, settled - 1, -1):
            if not self.alphabet.match(text, i):
                return i + 1
        return settled


_ATEXT = "-A-Za-z0-9!#$%&'*+/=?^_`{|}~"  # RFC 5322 atext (for a character class; "-" first)
_EMAIL = re.compile(
    rf"(?<![{_ATEXT}])[{_ATEXT}](?:[{_ATEXT}.]{{0,62}}[{_ATEXT}])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,5}[A-Za-z]{2,63}(?![A-Za-z0-9-])")


def _accept_email(m: re.Match[str]) -> int | None:
    local = m.group().split("@", 1)[0]
    return m.end() if ".." not in local and len(m.group()) <= 254 else None


# International numbers start with +CC; national ones need separators or an area code in
# parentheses, so plain numbers, years ("1999-2004") and dates never look like phones.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){1,7}"  # +44 20 7946 0958, +1 (415) 555-2671
    r"|\(\d{2,5}\)[ .-]?\d{2,4}[ .-]?\d{3,4}"  # (415) 555-2671
    r"|\d{3}([ .-])\d{3}\1\d{4}"  # 415-555-2671, 415 555 2671
    r"|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}"  # 020 7946 0958 (national trunk prefix 0)
    r"|\d{3}-\d{4}"  # 555-2671
    r")(?!\w|[.-]\w)")


def _accept_phone(m: re.Match[str]) -> int | None:
    digits = sum(c.isdigit() for c in m.group())
    return m.end() if 7 <= digits <= 15 else None  # E.164 allows at most 15 digits


_CARD = re.compile(r"(?<!\w)\d(?:[ -]?\d){12,18}(?![ -]?\d|\w)")


def _accept_card(m: re.Match[str]) -> int | None:
    digits = [int(c) for c in m.group() if c.isdigit()]
    # Luhn: double every second digit from the right; the digit sum must be a multiple of ten.
    total = sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d)
                for i, d in enumerate(reversed(digits)))
    return m.end() if total % 10 == 0 else None


_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:)(?:"
    r"[0-9A-Fa-f:]{1,36}:(?:\d{1,3}\.){3}\d{1,3}"  # ::ffff:192.0.2.1
    r"|[0-9A-Fa-f:]{1,38}[0-9A-Fa-f]"
    r"|[0-9A-Fa-f:]{0,37}::"
    r")(?!\w|:[0-9A-Fa-f:]|\.\d)")


def _accept_ip(parse: Callable[[str], object]) -> Callable[[re.Match[str]], int | None]:
    def accept(m: re.Match[str]) -> int | None:
        if not any(c.isalnum() for c in m.group()):  # "::" alone is punctuation, not an address
            return None
        try:
            parse(m.group())
        except ValueError:
            return None
        return m.end()
    return accept


# ISO 13616 lengths for common countries; other country codes need 15-34 characters.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}
# The electronic form (GB82WEST12345698765432) or the printed one, in groups of four.
_IBAN = re.compile(
    r"(?<!\w)[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)(?!\w)")


def _accept_iban(m: re.Match[str]) -> int | None:
    text = m.group()
    where = [i for i, c in enumerate(text) if c != " "]  # the index of each IBAN character
    length = _IBAN_LENGTHS.get(text[:2], len(where))
    if not 15 <= length <= 34 or len(where) < length:
        return None
    # A printed IBAN may run into a following group of four: cut it at the country's length,
    # but only where a group ends.
    if len(where) > length and text[where[length - 1] + 1] != " ":
        return None
    iban = "".join(text[i] for i in where[:length])
    # ISO 13616: move the first four characters to the end, read letters as 10..35, mod 97 == 1.
    number = int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4]))
    return m.start() + where[length - 1] + 1 if number % 97 == 1 else None


DETECTORS = {d.kind: d for d in (
    Detector("email", _EMAIL, _accept_email, re.compile(rf"[{_ATEXT}.@]"), 64 + 1 + 5 * 64 + 63 + 1),
    Detector("phone", _PHONE, _accept_phone, re.compile(r"[0-9+() .-]"), 4 + 7 * 7 + 2),
    Detector("card", _CARD, _accept_card, re.compile(r"[0-9 -]"), 19 + 18 + 2),
    Detector("ipv4", _IPV4, _accept_ip(ipaddress.IPv4Address), re.compile(r"[0-9.]"), 15 + 2),
    Detector("ipv6", _IPV6, _accept_ip(ipaddress.IPv6Address), re.compile(r"[0-9A-Fa-f:.]"),
              37 + 15 + 2),
    Detector("iban", _IBAN, _accept_iban, re.compile(r"[A-Z0-9 ]"), 4 + 7 * 5 + 5 + 1),
)}


def pii_kinds(kinds: str | Iterable[str], owner: str) -> tuple[str, ...]:
    """Validated PII kinds; "all" means every kind."""
    chosen = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if chosen == ("all",):
        return ALL_KINDS
    unknown = [k for k in chosen if k not in DETECTORS]
    if unknown:
        raise TrustgenError(f"{owner} has unknown PII kind(s) {', '.join(map(repr, unknown))}; "
                            f"use {', '.join(ALL_KINDS)} or \"all\".")
    if not chosen:
        raise TrustgenError(f"{owner} lists no PII kinds; use {', '.join(ALL_KINDS)} or \"all\".")
    return chosen


def find_pii(text: str, kinds: str | Iterable[str] = ALL_KINDS) -> list[Match]:
    """PII in `text`, in order and never overlapping: scanning left to right, the match that
    starts first wins, then the longest, then the kind listed first."""
    detectors = [DETECTORS[kind] for kind in pii_kinds(kinds, "find_pii")]
    found: list[Match] = []
    pos = 0
    while True:
        best: tuple[tuple[int, int, int], str, int, int] | None = None
        for order, detector in enumerate(detectors):
            span = detector.search(text, pos)
            if span is not None and (best is None or (span[0], span[0] - span[1], order) < best[0]):
                best = ((span[0], span[0] - span[1], order), detector.kind, *span)
        if best is None:
            return found
        _, kind, start, end = best
        found.append(Match(kind, start, end, text[start:end]))
        pos = end


def scrub_pii(text: str, kinds: str | Iterable[str] = ALL_KINDS) -> tuple[str, Counter[str]]:
    """`text` with each PII match replaced by its placeholder ([EMAIL], [CARD], ...), and the
    number of matches by kind. Training data preparation calls this once per document."""
    pieces, pos = [], 0
    matches = find_pii(text, pii_kinds(kinds, "scrub_pii"))
    for match in matches:
        pieces += [text[pos:match.start], PLACEHOLDERS[match.kind]]
        pos = match.end
    pieces.append(text[pos:])
    return "".join(pieces), Counter(m.kind for m in matches)


__all__ = ["ALL_KINDS", "DETECTORS", "PLACEHOLDERS", "Detector", "Match", "find_pii", "pii_kinds", "scrub_pii"]
