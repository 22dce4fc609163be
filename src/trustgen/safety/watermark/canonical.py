"""Text as a detector should read it: Unicode tricks that hide a watermark undone, and counted.

A text watermark lives in the token sequence, so anything that changes the tokens without
changing what a reader sees erases it: a zero-width space after every third character, or a
few Cyrillic letters that look like Latin ones (а е о р с), took every scheme from 32 of 32
detected to 0-2 of 32. Before detection a text is therefore canonicalized:

1. format characters (Unicode category Cf: zero-width space/joiner/non-joiner, word joiner,
   byte-order mark, soft hyphen, bidi controls) are removed: they are invisible by definition;
2. Unicode NFKC folds compatibility forms of letters, digits and spaces (full-width letters,
   ligatures, non-breaking spaces) to the plain ones; punctuation and symbols keep their form,
   since full-width punctuation is how Chinese and Japanese are written, not a trick;
3. a letter of another script that Unicode's confusables data (UTS #39, through the
   `confusable-homoglyphs` package) says looks like a Latin letter is replaced by that letter,
   but only where a reader would take it for Latin: inside a word that also holds Latin letters,
   or in a word made only of such look-alikes in mostly-Latin text. Greek, Cyrillic or Han text
   is left as it is.

ASCII text is returned unchanged. The counts of what was removed and folded are the tampering
signs a detector reports beside its verdict: generated text holds neither.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from itertools import groupby

_WORD = re.compile(r"[^\W\d_]+")  # a run of letters (any script)
_SCRIPTS_LEFT_ALONE = {"LATIN", "COMMON", "INHERITED"}


@dataclass(frozen=True)
class Tampering:
    """What canonicalization undid: signs that someone tried to hide a watermark."""

    invisible_removed: int = 0  # format characters (zero-width and friends) removed
    confusables_folded: int = 0  # look-alike letters of another script replaced by Latin ones

    @property
    def suspected(self) -> bool:
        return self.invisible_removed > 0 or self.confusables_folded > 0

    def to_dict(self) -> dict[str, int | bool]:
        return {"invisible_removed": self.invisible_removed, "confusables_folded": self.confusables_folded,
                "tampering_suspected": self.suspected}

    def describe(self) -> str:
        """A short clause for a verdict line ('' when nothing was undone)."""
        parts = [f"{count} {what}" for count, what in ((self.invisible_removed, "invisible characters removed"),
                                                       (self.confusables_folded, "look-alike letters folded"))
                 if count]
        return f"text tampered with? {', '.join(parts)}" if parts else ""


@cache
def _latin_lookalikes() -> dict[str, str]:
    """Letter of another script -> the Latin letter(s) it is confusable with (ASCII preferred)."""
    from confusable_homoglyphs import categories, confusables

    table = {}
    for char, glyphs in confusables.confusables_data.items():
        if len(char) != 1 or not char.isalpha() or categories.alias(char) in _SCRIPTS_LEFT_ALONE:
            continue
        latin = [g["c"] for g in glyphs
                 if g["c"].isalpha() and all(categories.alias(c) == "LATIN" for c in g["c"])]
        if latin:
            table[char] = min(latin, key=lambda g: (not g.isascii(), len(g)))
    return table


def _script(char: str) -> str:
    from confusable_homoglyphs import categories

    return "LATIN" if char.isascii() else categories.alias(char)


def _fold_word(word: str, mostly_latin: bool, table: dict[str, str]) -> tuple[str, int]:
    """The word with its look-alike letters folded, and how many were, when a reader would
    take the word for Latin; the word unchanged otherwise."""
    foreign = [c for c in word if _script(c) not in _SCRIPTS_LEFT_ALONE]
    if not foreign:
        return word, 0
    has_latin = any(_script(c) == "LATIN" for c in word)
    if not (has_latin or (mostly_latin and all(c in table for c in foreign))):
        return word, 0
    folded = sum(c in table for c in foreign)
    return "".join(table.get(c, c) for c in word), folded


def _punctuation_or_symbol(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def _mostly_latin(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return sum(_script(c) == "LATIN" for c in letters) * 2 > len(letters)


def canonicalize(text: str) -> tuple[str, Tampering]:
    """The text a detector should score, and what was undone to get it (see the module doc)."""
    if text.isascii():
        return text, Tampering()
    visible = "".join(c for c in text if unicodedata.category(c) != "Cf")
    invisible = len(text) - len(visible)
    runs = (("".join(run), punctuation) for punctuation, run in groupby(visible, _punctuation_or_symbol))
    normal = "".join(run if punctuation else unicodedata.normalize("NFKC", run) for run, punctuation in runs)
    table, mostly_latin = _latin_lookalikes(), _mostly_latin(normal)
    folded = 0

    def fold(match: re.Match[str]) -> str:
        nonlocal folded
        word, count = _fold_word(match.group(), mostly_latin, table)
        folded += count
        return word

    return _WORD.sub(fold, normal), Tampering(invisible, folded)
