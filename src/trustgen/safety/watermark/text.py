"""Text watermarks as logits processors, with detectors that need only tokens and the key.

`kgw` is the green-list watermark (Kirchenbauer et al. 2023, arXiv:2301.10226): at each step the vocabulary is split, pseudo-randomly given the preceding `context_width`
tokens and a secret key, into a "green" share γ and a "red" rest, and δ is added to the green
logits. Watermarked text then holds more green tokens than the γ expected by chance, which a
binomial test finds (its exact tail, not the z-score's normal approximation). `gumbel` is the
distortion-free exponential scheme (see GumbelWatermark). `detect_windowed` finds a watermarked
passage inside longer human text.

Keying: HMAC-SHA256(secret, token id) gives every token a 64-bit key value once per vocabulary
(a table); a token's greenness after a context is a splitmix64 hash of the context's key values
and the candidate id. The PRF is therefore keyed by HMAC with the secret, and both generation
(all V candidates at once) and detection (one hash per token) are vectorised integer arithmetic.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trustgen.errors import TrustgenError

MASK64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's constants
CANDIDATE_MIX = 0xD6E8FEB86659FD93  # spreads candidate ids over 64 bits before mixing


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser on uint64 arrays (array arithmetic wraps silently).
    In place on one new array and one scratch array: while decoding, every temporary array
    evicts some of the model from the CPU's caches."""
    x = x + np.uint64(GOLDEN)  # the caller's array stays as it was
    shifted = x >> np.uint64(30)
    x ^= shifted
    x *= np.uint64(MIX1)
    np.right_shift(x, np.uint64(27), out=shifted)
    x ^= shifted
    x *= np.uint64(MIX2)
    np.right_shift(x, np.uint64(31), out=shifted)
    x ^= shifted
    return x


def _splitmix64_int(x: int) -> int:
    """The same on one Python int: for a handful of values, ten times cheaper than an array."""
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


def key_id(secret: bytes) -> str:
    """A short public name for a secret key (safe to print and to put in manifests)."""
    return hashlib.sha256(b"trustgen-key-id:" + secret).hexdigest()[:12]


@dataclass(frozen=True)
class Detection:
    """The result of testing a token sequence for the watermark."""

    z_score: float
    p_value: float
    scored: int  # tokens tested (repeated context+token pairs are counted once)
    green: int  # scored tokens whose statistic is above its human-text mean (green, for kgw)
    green_flags: list[bool | None]  # per token: above (True), below (False), not scored (None)

    def is_watermarked(self, alpha: float = 1e-3) -> bool:
        return self.p_value < alpha


SMALL_BATCH = 16  # rows up to which context seeds are computed on Python ints


class KeyedHash:
    """The keyed pseudo-random function both schemes share: (context, token) -> 64 bits.

    HMAC-SHA256(secret, token id) gives every token a 64-bit key value once (a table); without
    the secret the table, and so every value, is unpredictable. Two ways to seed a candidate's
    hash, as compared by Kirchenbauer et al. 2023b (arXiv:2306.04634):

    - left hash (the default): the context tokens' key values and positions are chained with
      splitmix64 into a seed, and the candidate id is mixed into it;
    - self hash: the seed is the smallest key value among the context tokens *and the candidate
      itself* (a min-hash), and the candidate id is mixed into it (the anchor). Replacing a
      context token changes the seed only if it held the minimum, so a wide context keeps much
      of its robustness to edits; and since the candidate takes part in its own seed, its green
      lists cannot be read off by counting which tokens follow which.
    """

    def __init__(self, secret: bytes, vocab_size: int, context_width: int, self_hash: bool = False) -> None:
        if not secret:
            raise ValueError("the watermark key must not be empty")
        if context_width < 1:
            raise ValueError("context_width must be at least 1")
        self.vocab_size, self.context_width, self.self_hash = vocab_size, context_width, self_hash
        self.key_id = key_id(secret)
        self._token_keys = np.array(
            [int.from_bytes(hmac.new(secret, i.to_bytes(4, "little"), hashlib.sha256).digest()[:8], "little")
             for i in range(vocab_size)], dtype=np.uint64)
        self._mixed_candidates = np.arange(vocab_size, dtype=np.uint64) * np.uint64(CANDIDATE_MIX)

    def context_seeds(self, contexts: np.ndarray) -> np.ndarray:
        """(N, context_width) token ids -> (N,) uint64 seeds (before the candidate joins)."""
        if self.self_hash:
            return self._token_keys[contexts].min(axis=1)
        if len(contexts) <= SMALL_BATCH:  # while decoding: a few rows, where array calls cost most
            seeds = []
            for row in self._token_keys[contexts].tolist():
                seed = 0
                for position, key in enumerate(row):
                    seed = _splitmix64_int(seed ^ key ^ position)
                seeds.append(seed)
            return np.array(seeds, dtype=np.uint64)
        seed = np.zeros(len(contexts), dtype=np.uint64)
        for position in range(contexts.shape[1]):
            seed = _splitmix64(seed ^ self._token_keys[contexts[:, position]] ^ np.uint64(position))
        return seed

    def bits(self, seeds: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """uint64 hash of each (context seed, token) pair (broadcasting)."""
        return self._mix(seeds, tokens, tokens.astype(np.uint64) * np.uint64(CANDIDATE_MIX))

    def _own_seeds(self, seeds: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Each token's own seed after a context seed: the same, or for a self hash the smaller
        of it and the token's key value."""
        return np.minimum(seeds, self._token_keys[tokens]) if self.self_hash else seeds

    def _mix(self, seeds: np.ndarray, tokens: np.ndarray, mixed_tokens: np.ndarray) -> np.ndarray:
        return _splitmix64(self._own_seeds(seeds, tokens) ^ mixed_tokens)

    def history_seeds(self, history: torch.Tensor) -> np.ndarray:
        """(B, T) token history -> (B,) seeds of each row's last context_width tokens."""
        return self.context_seeds(history[:, -self.context_width:].clamp(max=self.vocab_size - 1).cpu().numpy())

    def candidates_after(self, seeds: np.ndarray) -> np.ndarray:
        """(N,) context seeds -> (N, vocab_size) hashes of every candidate: bits() with the
        candidates' mixing done once."""
        return self._mix(seeds[:, None], np.arange(self.vocab_size)[None, :], self._mixed_candidates[None, :])

    def all_candidates(self, history: torch.Tensor) -> np.ndarray:
        """(B, vocab_size) hashes of every candidate after each row's last tokens."""
        return self.candidates_after(self.history_seeds(history))

    def scored_pairs(self, tokens: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and hashes of the tokens a detector scores.

        A token's hash is a function of its seed and its id, so a repeated (seed, token) pair
        repeats its statistic and adds no evidence: each distinct pair counts once (Kirchenbauer
        et al. 2023b, arXiv:2306.04634, count repeated n-grams once). For a left hash that is
        each distinct n-gram; a self hash maps many n-grams to one seed, and counting them all
        would let frequent tokens tilt human text."""
        ids = np.asarray(tokens, dtype=np.int64)
        h = self.context_width
        if len(ids) <= h:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        windows = np.lib.stride_tricks.sliding_window_view(ids, h + 1)
        valid = np.flatnonzero((windows >= 0).all(axis=1) & (windows < self.vocab_size).all(axis=1))
        seeds, scored = self.context_seeds(windows[valid, :h]), windows[valid, h]
        pairs = np.stack([self._own_seeds(seeds, scored), scored.astype(np.uint64)], axis=1)
        _, first = np.unique(pairs, axis=0, return_index=True)
        keep = np.sort(first)
        return valid[keep] + h, self.bits(seeds[keep], scored[keep])


class KGWWatermark:
    """A logits processor that adds δ to the green list, and its detector."""

    def __init__(self, secret: bytes, vocab_size: int, gamma: float = 0.25, delta: float = 2.0,
                 context_width: int = 1, self_hash: bool = False) -> None:
        if not 0 < gamma < 1 or delta < 0:
            raise ValueError("need 0 < gamma < 1 and delta >= 0")
        self.gamma, self.delta = gamma, delta
        self.scheme = "kgw-selfhash" if self_hash else "kgw"
        self.null_mean = gamma  # a token's expected statistic in human text
        self.hash = KeyedHash(secret, vocab_size, context_width, self_hash)
        self.key_id = self.hash.key_id
        self._threshold = np.uint64(min(int(gamma * 2**64), MASK64))
        # A green list depends on the context only through its seed, and decoding meets the same
        # seeds again and again (a one-token left hash has vocab_size of them; a self hash's seed
        # is one of the context's key values), so each seed's bias is kept (bounded to ~64 MB).
        self._bias_cache: dict[int, torch.Tensor] = {}
        self._cache_limit = max(1, (64 << 20) // (4 * vocab_size))

    def green_mask(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) history -> (B, vocab_size) bool: the green list after each row's context."""
        return torch.from_numpy(self.hash.all_candidates(history) < self._threshold)

    def _bias(self, history: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, vocab_size) additive bias: δ on each row's green list."""
        rows = []
        for seed in self.hash.history_seeds(history).tolist():
            bias = self._bias_cache.get(seed)
            if bias is None or bias.device != like.device or bias.dtype != like.dtype:
                if len(self._bias_cache) >= self._cache_limit:
                    self._bias_cache.clear()
                green = self.hash.candidates_after(np.array([seed], dtype=np.uint64))[0] < self._threshold
                bias = self.delta * torch.from_numpy(green).to(like.device, like.dtype)
                self._bias_cache[seed] = bias
            rows.append(bias)
        return torch.stack(rows)

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if history.shape[1] < self.hash.context_width:
            return scores
        width = min(scores.shape[-1], self.hash.vocab_size)
        boosted = scores.clone()
        boosted[:, :width] += self._bias(history, scores)[:, :width]
        return boosted

    def token_scores(self, tokens: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scored positions and their statistic: 1 for a green token, 0 for a red one."""
        positions, bits = self.hash.scored_pairs(tokens)
        return positions, (bits < self._threshold).astype(np.float64)

    def z_and_p(self, total: float, n: int) -> tuple[float, float]:
        """`total` green among `n` scored: the one-proportion z-score against γ, and the exact
        p-value P(Binomial(n, γ) >= total). Kirchenbauer et al. read p off the z-score's normal
        tail, which is too thin at these lengths: for n = 30-400 it called 0.14-0.28% of human
        texts significant at p < 0.001, and on 200-token chunks of Python's documentation 1.45%
        fell below p = 0.01."""
        from scipy.special import bdtrc

        z = (total - self.gamma * n) / math.sqrt(n * self.gamma * (1 - self.gamma))
        return z, float(bdtrc(round(total) - 1, n, self.gamma))

    def detect(self, tokens: list[int] | np.ndarray) -> Detection:
        return _detect(self, tokens)


class GumbelWatermark:
    """Aaronson's distortion-free exponential scheme (Aaronson 2022; Kuditipudi et al. 2023,
    arXiv:2307.15593, analyse it).

    Each candidate i gets a keyed uniform r_i from the context; the token chosen is
    argmax r_i^(1/p_i), which is exactly a sample from p (the Gumbel-max trick), so the text's
    distribution is unchanged. The chosen tokens have large r, and Σ −ln(1 − r) over n scored
    tokens, Gamma(n, 1) for human text, is the detection statistic.

    As a processor it turns the scores into a one-hot choice, so it must come last in the chain
    (after temperature and truncation, which shape p).
    """

    scheme = "gumbel"
    null_mean = 1.0  # −ln(1 − r) is Exp(1) in human text
    decides = True  # its one-hot scores are the draw: decoding takes their argmax

    def __init__(self, secret: bytes, vocab_size: int, context_width: int = 4) -> None:
        # The choice is a deterministic function of the context, so a short context makes text
        # loop: with one character of context a random model repeated 9 distinct pairs over 200
        # tokens; with 4, 196 of 200 tokens were distinct scored pairs.
        self.hash = KeyedHash(secret, vocab_size, context_width)
        self.key_id = self.hash.key_id

    @staticmethod
    def _uniform(bits: np.ndarray) -> np.ndarray:
        """uint64 -> float64 in (0, 1): the top 53 bits, shifted off zero (in one new array)."""
        r = (bits >> np.uint64(11)).astype(np.float64)
        r += 0.5
        r *= 2.0**-53
        return r

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        width = min(scores.shape[-1], self.hash.vocab_size)
        logits = scores[:, :width].float().cpu().numpy()
        # argmax r^(1/p) = argmin −ln(r) / p = argmin ln(−ln r) − logit: the softmax's normaliser
        # is common to every candidate, so no softmax is needed, and a −inf logit never wins.
        # Computed in place, in few calls: right after a forward pass every call is slow.
        race = self._uniform(self.hash.all_candidates(history)[:, :width])
        np.log(race, out=race)
        np.negative(race, out=race)
        np.log(race, out=race)
        race -= logits
        choice = torch.from_numpy(race.argmin(axis=1)).to(scores.device)
        return torch.full_like(scores, -math.inf).scatter_(1, choice[:, None], 0.0)

    def token_scores(self, tokens: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scored positions and their statistic −ln(1 − r): Exp(1) for human text."""
        positions, bits = self.hash.scored_pairs(tokens)
        return positions, -np.log1p(-self._uniform(bits))

    def z_and_p(self, total: float, n: int) -> tuple[float, float]:
        """Upper-tail p-value of a sum of n Exp(1) under Gamma(n, 1); z is its normal form."""
        from scipy.special import gammaincc

        return (total - n) / math.sqrt(n), float(gammaincc(n, total))

    def detect(self, tokens: list[int] | np.ndarray) -> Detection:
        return _detect(self, tokens)


# Tournament layers. Under one key the tournament tilts every text the same way at the same
# context, so depth trades power for diversity between samples: on a character model (200
# tokens, 32 samples of one prompt), the paper's 30 layers left distinct-2 at 0.66 of
# unwatermarked sampling; 8 layers 0.86-0.98, 3 layers 0.95-1.0 with every sample still found
# at p < 0.01 (median p 1e-8 at temperature 0.8 and top-p 0.95). See docs/text-watermark.md.
SYNTHID_DEPTH = 3


class SynthIDWatermark:
    """SynthID-Text's tournament sampling (Dathathri et al. 2024, Nature 634:818): distortion-free
    and diverse.

    Each candidate has `depth` keyed bits g_1..g_depth (from its hash after the context, as
    KeyedHash gives it). A tournament draws 2^depth candidates from the model's distribution p
    and lets them play in pairs, layer by layer: in layer l the one with the larger g_l wins (a
    tie, a coin flip). The winner's distribution has a closed form, one layer at a time,
    p ← p · (1 + g_l − Σ_j p_j g_j), so the processor returns that distribution and the decoder
    samples it with the generation's own random numbers: unlike `gumbel`, whose choice is a
    function of the context alone, samples differ with the seed and between rows. Averaged over
    keys, the winner is distributed as p. A context already met in the same text is left
    unwatermarked (the paper's repeated-context masking), so a text revisiting a context is not
    pushed the same way twice.

    Chosen tokens have more g-values of 1 than the half expected of human text; each scored
    token contributes its count of ones, Binomial(depth, 1/2) under human text, so a text's
    total is tested exactly against Binomial(n · depth, 1/2). It must come last in the chain,
    after temperature and truncation, which shape p.
    """

    scheme = "synthid"

    def __init__(self, secret: bytes, vocab_size: int, context_width: int = 4, depth: int = SYNTHID_DEPTH) -> None:
        if not 1 <= depth <= 64:
            raise ValueError("depth must be between 1 and 64 (one hash bit per layer)")
        self.hash = KeyedHash(secret, vocab_size, context_width)
        self.key_id = self.hash.key_id
        self.depth = depth
        self.null_mean = depth / 2  # a token's expected count of ones in human text

    def _fresh_context(self, history: torch.Tensor) -> np.ndarray:
        """(B,) bool: whether each row's last context_width tokens appear nowhere earlier in it."""
        h = self.hash.context_width
        rows = history.cpu().numpy()
        if rows.shape[1] <= h:
            return np.ones(len(rows), dtype=bool)
        earlier = np.lib.stride_tricks.sliding_window_view(rows[:, :-1], h, axis=1)  # (B, T - h, h)
        return ~(earlier == rows[:, None, -h:]).all(axis=2).any(axis=1)

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        fresh = self._fresh_context(history)
        if history.shape[1] < self.hash.context_width or not fresh.any():
            return scores
        width = min(scores.shape[-1], self.hash.vocab_size)
        probs = scores[fresh, :width].double().softmax(dim=-1).cpu().numpy()
        bits = self.hash.all_candidates(history[torch.from_numpy(fresh).to(history.device)])[:, :width]
        for layer in range(self.depth):  # one tournament layer per hash bit, from the top bit down
            g = ((bits >> np.uint64(63 - layer)) & np.uint64(1)).astype(np.float64)
            probs *= 1.0 + g - (probs * g).sum(axis=1, keepdims=True)
            np.maximum(probs, 0.0, out=probs)  # a token with g = 0 when Σ p g rounds above 1
        out = scores.clone()
        with np.errstate(divide="ignore"):  # a token the chain removed keeps probability 0: −inf
            out[torch.from_numpy(fresh).to(scores.device), :width] = torch.from_numpy(np.log(probs)).to(
                scores.device, scores.dtype)
        return out

    def token_scores(self, tokens: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scored positions and their statistic: the count of ones among the token's g-values."""
        positions, bits = self.hash.scored_pairs(tokens)
        top = bits >> np.uint64(64 - self.depth)
        return positions, np.array([bin(v).count("1") for v in top.tolist()], dtype=np.float64)

    def z_and_p(self, total: float, n: int) -> tuple[float, float]:
        """`total` ones among n scored tokens' g-values: z against half, and the exact p-value
        P(Binomial(n · depth, 1/2) >= total)."""
        from scipy.special import bdtrc

        trials = n * self.depth
        return (total - trials / 2) / math.sqrt(trials / 4), float(bdtrc(round(total) - 1, trials, 0.5))

    def detect(self, tokens: list[int] | np.ndarray) -> Detection:
        return _detect(self, tokens)


Watermark = KGWWatermark | GumbelWatermark | SynthIDWatermark


def _detect(scheme: Watermark, tokens: list[int] | np.ndarray) -> Detection:
    """Test the whole sequence. A token is flagged when its statistic exceeds its mean under
    human text (green for KGW; r > 1 − 1/e for Gumbel), for highlighting."""
    positions, values = scheme.token_scores(tokens)
    flags: list[bool | None] = [None] * len(tokens)
    mean = scheme.null_mean
    for position, value in zip(positions.tolist(), values.tolist(), strict=True):
        flags[position] = value > mean
    if len(values) == 0:
        return Detection(0.0, 1.0, 0, 0, flags)
    z, p = scheme.z_and_p(float(values.sum()), len(values))
    return Detection(z, p, len(values), int((values > mean).sum()), flags)


@dataclass(frozen=True)
class WindowDetection:
    """The most watermark-like stretch of a longer text."""

    start: int  # token positions [start, end) of the best window
    end: int
    z_score: float
    p_value: float  # Bonferroni-corrected over all windows tried

    def is_watermarked(self, alpha: float = 1e-3) -> bool:
        return self.p_value < alpha


def detect_windowed(scheme: Watermark, tokens: list[int] | np.ndarray,
                    window: int = 200) -> WindowDetection:
    """Find a watermarked passage pasted inside other text: score every run of `window`
    consecutive scored tokens and correct the best one's p-value for the number of runs."""
    positions, values = scheme.token_scores(tokens)
    if len(values) <= window:
        result = scheme.detect(tokens)
        return WindowDetection(0, len(tokens), result.z_score, result.p_value)
    sums = np.convolve(values, np.ones(window), mode="valid")
    best = int(sums.argmax())
    z, p = scheme.z_and_p(float(sums[best]), window)
    return WindowDetection(int(positions[best]), int(positions[best + window - 1]) + 1, z,
                           min(1.0, p * len(sums)))


def highlight(pieces: list[str], flags: list[bool | None], html: bool = False) -> str:
    """The text with each scored token marked: green where it carries the watermark signal,
    red where it does not, unmarked where it was not scored. `pieces` are the tokens' texts."""
    import html as html_escape

    out = []
    for piece, flag in zip(pieces, flags, strict=True):
        if html:
            text = html_escape.escape(piece)
            out.append(text if flag is None else f'<span class="{"green" if flag else "red"}">{text}</span>')
        else:
            out.append(piece if flag is None else f"\033[{32 if flag else 31}m{piece}\033[0m")
    if not html:
        return "".join(out)
    return ("<!doctype html><meta charset=utf-8><title>watermark</title><style>"
            "body{font-family:monospace;white-space:pre-wrap}.green{background:#c8f7c5}"
            ".red{background:#f7c5c5}</style><body>" + "".join(out) + "</body>")


CHAR_VOCABULARY = 512  # vocabularies up to this size are characters or bytes, not subwords
# The context each scheme hashed before manifests recorded it: a manifest without a
# `context_width` was made with these.
LEGACY_CONTEXT_WIDTHS = {"kgw": 1, "kgw-selfhash": 3, "gumbel": 4, "synthid": 4}


def default_context_width(scheme: str, vocab_size: int) -> int:
    """How many previous tokens seed a scheme's green list (or race), by vocabulary.

    With one previous token, the few frequent pairs of a language decide much of every text's
    statistic, the same way for every text under one key, so some keys flag far more human
    text than the p-value says: at p < 0.01 on 200-token chunks, the worst of 20 keys flagged
    3.9% of Python's docstrings (BPE, 4,096 tokens) and 4.6% of two plays (characters).
    Hashing three subword tokens, or four characters, gives each text enough distinct contexts:
    the worst key fell to 1.5% (docstrings) and 1.8% (plays, a 1,000-token BPE) and to 1.4%
    (plays, characters), and a character model's low-entropy text scores more distinct
    (context, token) pairs. The self hash (a min-hash over h = 4) and gumbel keep their widths."""
    if scheme == "kgw":
        return 4 if vocab_size <= CHAR_VOCABULARY else 3
    return LEGACY_CONTEXT_WIDTHS[scheme]


Factory = Callable[..., Watermark]  # (secret, vocab_size, context_width=None) -> a watermark


def _with_default_width(scheme: str, build: Callable[[bytes, int, int], Watermark]) -> Factory:
    def factory(secret: bytes, vocab_size: int, context_width: int | None = None) -> Watermark:
        return build(secret, vocab_size, context_width or default_context_width(scheme, vocab_size))
    return factory


SCHEMES: dict[str, Factory] = {
    # γ=0.25, δ=2, left hash of three subword tokens or four characters
    "kgw": _with_default_width("kgw", lambda secret, vocab, width: KGWWatermark(secret, vocab, context_width=width)),
    # The self hash over the three tokens before and the token itself (h = 4, as recommended
    # by Kirchenbauer et al. 2023b).
    # Tournament sampling over SYNTHID_DEPTH layers, hashing four previous tokens.
    "synthid": _with_default_width("synthid", lambda secret, vocab, width: SynthIDWatermark(
        secret, vocab, context_width=width)),
}


# Schemes that only test text an older trustgen made, named by its manifest, and why generation
# no longer offers them (said to whoever asks for one).
DETECT_ONLY: dict[str, Factory] = {
    "gumbel": _with_default_width("gumbel", lambda secret, vocab, width: GumbelWatermark(
        secret, vocab, context_width=width)),
    "kgw-selfhash": _with_default_width("kgw-selfhash", lambda secret, vocab, width: KGWWatermark(
        secret, vocab, context_width=width, self_hash=True)),
}
RETIRED_BECAUSE = {
    # Each token was a function of its context and the key alone: every seed and row, one text.
    "gumbel": "gave the same text for every seed; use synthid for a distortion-free watermark",
    # Its min-hash seeds come from the few frequent tokens that hold the smallest key values, so
    # one text's verdicts share most of their green lists with the next one's: at p < 0.01 on
    # 200-token chunks, the worst of 20 keys flagged 3.8% of docstrings (BPE) and 7.9% of plays
    # (characters), where kgw's worst stayed under 2% (docs/text-watermark.md).
    "kgw-selfhash": ("flagged up to 7.9% of human text at p < 0.01 under some keys, not the 1% its "
                     "p-value promised; use kgw"),
}


def make_watermark(scheme: str, secret: bytes, vocab_size: int, context_width: int | None = None) -> Watermark:
    """A scheme by name, hashing `context_width` previous tokens (default: default_context_width).
    DETECT_ONLY schemes are built too, for detection; generation offers SCHEMES alone."""
    build = SCHEMES.get(scheme) or DETECT_ONLY.get(scheme)
    if build is None:
        raise TrustgenError(f"unknown watermark scheme {scheme!r}; choose {', '.join(SCHEMES)} or none.")
    return build(secret, vocab_size, context_width)
