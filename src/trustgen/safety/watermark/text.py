"""The KGW green-list text watermark (Kirchenbauer et al. 2023, arXiv:2301.10226).

At each step the vocabulary is split, pseudo-randomly given the preceding `context_width`
tokens and a secret key, into a "green" share γ and a "red" rest, and δ is added to the green
logits. Watermarked text then holds more green tokens than the γ expected by chance, which a
one-proportion z-test finds from the text, the tokenizer and the key alone — no model needed.

Keying: HMAC-SHA256(secret, token id) gives every token a 64-bit key value once per vocabulary
(a table); a token's greenness after a context is a splitmix64 hash of the context's key values
and the candidate id. The PRF is therefore keyed by HMAC with the secret, and both generation
(all V candidates at once) and detection (one hash per token) are vectorised integer arithmetic.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

import numpy as np
import torch

MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def key_id(secret: bytes) -> str:
    """A short public name for a secret key (safe to print and to put in manifests)."""
    return hashlib.sha256(b"trustgen-key-id:" + secret).hexdigest()[:12]


@dataclass(frozen=True)
class Detection:
    """The result of testing a token sequence for the watermark."""

    z_score: float
    p_value: float
    scored: int  # tokens tested (repeated context+token pairs are counted once)
    green: int
    green_flags: list[bool | None]  # per token: green, red, or None (not scored)

    def is_watermarked(self, alpha: float = 1e-3) -> bool:
        return self.p_value < alpha


class KGWWatermark:
    """A logits processor that adds δ to the green list, and its detector."""

    scheme = "kgw"

    def __init__(self, secret: bytes, vocab_size: int, gamma: float = 0.25, delta: float = 2.0,
                 context_width: int = 1) -> None:
        if not secret:
            raise ValueError("the watermark key must not be empty")
        if not 0 < gamma < 1 or delta < 0 or context_width < 1:
            raise ValueError("need 0 < gamma < 1, delta >= 0 and context_width >= 1")
        self.gamma, self.delta, self.context_width = gamma, delta, context_width
        self.vocab_size = vocab_size
        self.key_id = key_id(secret)
        # One HMAC per token id: the secret enters every green list through this table.
        self._token_keys = np.array(
            [int.from_bytes(hmac.new(secret, i.to_bytes(4, "little"), hashlib.sha256).digest()[:8], "little")
             for i in range(vocab_size)], dtype=np.uint64)
        self._threshold = np.uint64(min(int(gamma * 2**64), MASK64))
        self._candidates = np.arange(vocab_size, dtype=np.uint64)

    def _context_seed(self, contexts: np.ndarray) -> np.ndarray:
        """(N, context_width) token ids -> (N,) uint64 seeds, position-aware."""
        seed = np.zeros(len(contexts), dtype=np.uint64)
        for position in range(contexts.shape[1]):
            seed = _splitmix64(seed ^ self._token_keys[contexts[:, position]] ^ np.uint64(position))
        return seed

    def _is_green(self, seeds: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return _splitmix64(seeds ^ (tokens.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93))) < self._threshold

    def green_mask(self, contexts: torch.Tensor) -> torch.Tensor:
        """(B, context_width) -> (B, vocab_size) bool: the green list after each context."""
        seeds = self._context_seed(contexts.cpu().numpy())
        green = self._is_green(seeds[:, None], self._candidates[None, :])
        return torch.from_numpy(green)

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if history.shape[1] < self.context_width:
            return scores
        contexts = history[:, -self.context_width:].clamp(max=self.vocab_size - 1)
        green = self.green_mask(contexts).to(scores.device)
        width = min(scores.shape[-1], self.vocab_size)
        boosted = scores.clone()
        boosted[:, :width] += self.delta * green[:, :width]
        return boosted

    def detect(self, tokens: list[int] | np.ndarray) -> Detection:
        """z-test for a green share above γ; each (context, token) pair counts once, so
        repeated phrases cannot inflate the score (Kirchenbauer et al. 2023b, arXiv:2306.04634)."""
        ids = np.asarray(tokens, dtype=np.int64)
        h = self.context_width
        flags: list[bool | None] = [None] * len(ids)
        if len(ids) <= h:
            return Detection(0.0, 1.0, 0, 0, flags)
        windows = np.lib.stride_tricks.sliding_window_view(ids, h + 1)
        valid = (windows >= 0).all(axis=1) & (windows < self.vocab_size).all(axis=1)
        _, first = np.unique(windows, axis=0, return_index=True)
        keep = np.zeros(len(windows), dtype=bool)
        keep[first] = True
        keep &= valid
        rows = np.flatnonzero(keep)
        green = self._is_green(self._context_seed(windows[rows, :h]), windows[rows, h])
        for row, is_green in zip(rows.tolist(), green.tolist(), strict=True):
            flags[row + h] = bool(is_green)
        scored, hits = len(rows), int(green.sum())
        if scored == 0:
            return Detection(0.0, 1.0, 0, 0, flags)
        z = (hits - self.gamma * scored) / math.sqrt(scored * self.gamma * (1 - self.gamma))
        return Detection(z, 0.5 * math.erfc(z / math.sqrt(2)), scored, hits, flags)
