"""Counterfactual data augmentation (Lu et al. 2018, "Gender Bias in Neural Natural Language
Processing", arXiv:1807.11714; Zmigrod et al. 2019, arXiv:1906.04571): a copy of every training
document with its gendered words swapped (he <-> she, king <-> queen), whole words only and in
the original's case.

The word pairs are an editable tab-separated file, `word_pairs/gender_pairs.tsv`; every function
also takes its own list. The fairness audit (trustgen.evaluate.fairness) measures what the
augmentation is meant to mitigate.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from trustgen.data.text import Document, transform_documents
from trustgen.errors import TrustgenError

AUGMENT_VERSION = 1  # part of the cache key of augmented corpora: change it when the swap changes


def _read_pairs(path: str | Path | None) -> str:
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TrustgenError(f"the word-pair file {path} does not exist.") from None
    return resources.files("trustgen.data").joinpath("word_pairs", "gender_pairs.tsv").read_text(encoding="utf-8")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_word_pairs(path: str | Path | None = None) -> dict[str, str]:
    """The swap map of a tab-separated pair list, both ways, lower case; a word listed twice
    keeps its first partner (default: the shipped gender_pairs.tsv)."""
    swaps: dict[str, str] = {}
    for number, line in enumerate(_lines(_read_pairs(path)), 1):
        parts = line.split("\t")
        if len(parts) != 2 or not all(re.fullmatch(r"[\w'-]+", p.strip()) for p in parts):
            raise TrustgenError(f"line {number} of the word-pair list must be two words separated by a tab, "
                                f"got {line!r}.")
        a, b = (p.strip().lower() for p in parts)
        swaps.setdefault(a, b)
        swaps.setdefault(b, a)
    return swaps


# -- counterfactual data augmentation -----------------------------------------------------------

def _match_case(source: str, target: str) -> str:
    """`target` written in the case of `source`: HE -> SHE, He -> She, he -> she."""
    if len(source) > 1 and source.isupper():
        return target.upper()
    if source[:1].isupper():
        return target[:1].upper() + target[1:]
    return target


@functools.lru_cache(maxsize=8)
def _swap_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so "himself" is never read as "him" + "self"; \b keeps whole words, and an
    # apostrophe is a word boundary, so "king's" becomes "queen's".
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def swap_words(text: str, swaps: Mapping[str, str]) -> tuple[str, int]:
    """`text` with every listed word replaced by its partner, whole words only, keeping the
    original's case; and the number of words swapped."""
    if not swaps:
        return text, 0
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        word = match.group(0)
        return _match_case(word, swaps[word.lower()])

    return _swap_pattern(tuple(sorted(swaps))).sub(replace, text), count


def augment_documents(documents: list[Document], axis: str = "gender",
                      pairs_path: str | Path | None = None) -> tuple[list[Document], int]:
    """Counterfactual data augmentation: the documents followed by a copy of each with its
    `axis` words swapped (Lu et al. 2018), and the number of words swapped. The copies are
    written once into the cache, like scrubbed corpora."""
    if axis != "gender":
        raise TrustgenError(f"counterfactual augmentation swaps gendered words; there is no word-pair list for {axis!r}.")
    swaps = load_word_pairs(pairs_path)
    pairs_key = "|".join(f"{a}>{b}" for a, b in sorted(swaps.items()))
    tag = f"cda-{axis}-{AUGMENT_VERSION}-{pairs_key}"

    def transform(text: str) -> tuple[str, dict[str, int]]:
        swapped, n = swap_words(text, swaps)
        return swapped, {"swapped_words": n}

    copies, counts = transform_documents(documents, tag, transform)
    copies = [Document(f"{doc.name} (counterfactual {axis})", path=copy.path) for doc, copy in zip(documents, copies, strict=True)]
    return [*documents, *copies], counts.get("swapped_words", 0)


__all__ = ["AUGMENT_VERSION", "augment_documents", "load_word_pairs", "swap_words"]
