"""Canaries (Carlini et al. 2019, "The Secret Sharer", arXiv:1802.08232): random secrets of a
fixed format that data preparation inserts into a run's training data 1, 10 and 100 times, so an
audit can measure how much the model memorized them (trustgen.evaluate.memorization.exposures).

The secrets and their order are drawn from the run's seed, so resuming a run rebuilds the same
training data; as many never-inserted controls of the same format are drawn beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CANARY_PREFIX = "my secret number is "
CANARY_DIGITS = 9  # |R| = 10^9 possible secrets, as in the Secret Sharer's 9-digit format
CANARY_REPETITIONS = (1, 10, 100)
CANARY_DOCUMENT = "<canaries>"
CANARY_NOTE = ("SYNTHETIC CANARIES, NOT REAL DATA: random secrets inserted into this run's training data by "
               "`trustgen train --canaries` to measure memorization (Carlini et al. 2019, 'The Secret Sharer'). "
               "'controls' were never inserted.")


@dataclass(frozen=True)
class Canary:
    secret: str
    repetitions: int  # 0 for a control that was never inserted

    @property
    def text(self) -> str:
        return CANARY_PREFIX + self.secret


def make_canaries(n: int, seed: int) -> tuple[list[Canary], list[Canary]]:
    """`n` inserted canaries (repetitions cycling 1, 10, 100) and as many never-inserted controls
    of the same format, all distinct, drawn from a generator seeded by the run's seed so that
    resuming a run rebuilds the same training data."""
    rng = np.random.default_rng([seed, 0xCA7A])
    secrets: list[str] = []
    while len(secrets) < 2 * n:
        secret = "".join(str(d) for d in rng.integers(0, 10, CANARY_DIGITS))
        if secret not in secrets:
            secrets.append(secret)
    inserted = [Canary(s, CANARY_REPETITIONS[i % len(CANARY_REPETITIONS)]) for i, s in enumerate(secrets[:n])]
    return inserted, [Canary(s, 0) for s in secrets[n:]]


def canary_text(inserted: Sequence[Canary], seed: int) -> str:
    """Every copy of every inserted canary, one per line, in a seeded random order (copies of one
    canary are spread out, not adjacent)."""
    lines = [c.text for c in inserted for _ in range(c.repetitions)]
    order = np.random.default_rng([seed, 0x11AE]).permutation(len(lines))
    return "\n".join(lines[i] for i in order) + "\n"


def canary_record(inserted: Sequence[Canary], controls: Sequence[Canary]) -> dict[str, Any]:
    """What canaries.json holds in the run directory."""
    return {"note": CANARY_NOTE, "format": CANARY_PREFIX + "#" * CANARY_DIGITS, "alphabet": "0123456789",
            "digits": CANARY_DIGITS, "document": CANARY_DOCUMENT,
            "inserted": [{"secret": c.secret, "text": c.text, "repetitions": c.repetitions} for c in inserted],
            "controls": [{"secret": c.secret, "text": c.text, "repetitions": 0} for c in controls]}


__all__ = ["CANARY_DIGITS", "CANARY_DOCUMENT", "CANARY_PREFIX", "CANARY_REPETITIONS", "Canary", "canary_record",
           "canary_text", "make_canaries"]
