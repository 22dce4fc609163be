"""Where trustgen keeps what it can rebuild: token files, transformed corpora, decoded image
folders and trained feature networks.

All caches live in one folder: $TRUSTGEN_CACHE, or ~/.cache/trustgen. It is read on every call,
so a test or a benchmark can point it elsewhere for a while.
"""

from __future__ import annotations

import os
from pathlib import Path

from trustgen.errors import TrustgenError

# tokens: tokenized corpora (data/text.py); transformed: scrubbed or augmented copies of corpora;
# images: decoded image folders (data/images.py); classifiers: the image metrics' feature networks;
# music: Bach's chorales read from music21's corpus (data/music.py)
KINDS = ("tokens", "transformed", "images", "classifiers", "music")


def cache_root() -> Path:
    """The folder every cache lives in."""
    return Path(os.environ.get("TRUSTGEN_CACHE") or Path.home() / ".cache" / "trustgen")


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cache (not created here: writers make it when they write)."""
    if kind not in KINDS:
        raise TrustgenError(f"there is no cache of kind {kind!r}; the kinds are {', '.join(KINDS)}.")
    return cache_root() / kind


__all__ = ["KINDS", "cache_dir", "cache_root"]
