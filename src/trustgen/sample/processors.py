"""Logits processors: small functions from (history, scores) to scores, applied in a chain.

`history` is the (B, T) tensor of every token so far (prompt and generated), left-padded with
`PAD` = vocab size where prompts differ in length; `scores` is (B, V) of next-token logits.
A processor returns new scores; -inf removes a token. A watermark is one more processor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from trustgen.config import SampleConfig


class LogitsProcessor(Protocol):
    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


def chain_decides(chain: Sequence[LogitsProcessor]) -> bool:
    """Whether the chain's last processor chooses the token itself (a `decides` attribute, as
    the Gumbel watermark has): its scores are one-hot, so taking their argmax is the draw, and
    sampling from them again would only cost time (about 3% of a decoding step here)."""
    return bool(chain) and getattr(chain[-1], "decides", False)


def apply_chain(chain: Sequence[LogitsProcessor], history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in chain:
        scores = processor(history, scores)
    return scores


def _keep_leading_mass(scores: torch.Tensor, probs: torch.Tensor, order: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the shortest prefix of each row's `order` whose probability mass reaches p: a token
    is dropped when the tokens ranked before it already hold p. The first is always kept."""
    sorted_probs = probs.gather(-1, order)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


class Temperature:
    """Divide logits by t: t < 1 sharpens the distribution, t > 1 flattens it."""

    def __init__(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be positive; use greedy decoding for 0")
        self.temperature = temperature

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k highest-scoring tokens (Fan et al. 2018)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.k >= scores.shape[-1]:
            return scores
        kth = torch.topk(scores, self.k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, -math.inf)


class TopP:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probability mass is at least p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(scores, descending=True, dim=-1)
        return _keep_leading_mass(scores, scores.softmax(dim=-1), order, self.p)


class MinP:
    """Keep tokens whose probability is at least p times the top token's (Nguyen et al. 2024,
    arXiv:2407.01082)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        threshold = self.p * probs.max(dim=-1, keepdim=True).values
        return scores.masked_fill(probs < threshold, -math.inf)


class TypicalP:
    """Locally typical sampling (Meister et al. 2023, arXiv:2202.00666): rank tokens by how close
    their surprisal is to the distribution's entropy and keep the smallest such set with mass ≥ p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = scores.float().log_softmax(dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.nan_to_num(neginf=0.0)).sum(dim=-1, keepdim=True)
        distance = (-log_probs - entropy).abs()
        return _keep_leading_mass(scores, probs, torch.argsort(distance, dim=-1), self.p)


class RepetitionPenalty:
    """CTRL's penalty (Keskar et al. 2019): a token already in the history has its positive logit
    divided by θ and its negative logit multiplied by θ."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        seen = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
        seen.scatter_(1, history.clamp(max=vocab), True)  # column `vocab` collects padding
        seen = seen[:, :vocab]
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


class NoRepeatNGram:
    """Forbid any token that would repeat an n-gram already present in the history."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        vocab = scores.shape[-1]
        scores = scores.clone()
        for row, tokens in enumerate(history.tolist()):
            tokens = [t for t in tokens if t < vocab]
            if len(tokens) < n - 1 or (n == 1 and not tokens):
                continue
            prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1)
                      if tuple(tokens[i:i + n - 1]) == prefix}
            allowed = scores[row].clone()
            allowed[list(banned)] = -math.inf
            # Banning every remaining token would leave nothing to sample; then the rule yields.
            if banned and torch.isfinite(allowed).any():
                scores[row] = allowed
        return scores


def build_chain(config: SampleConfig) -> list[LogitsProcessor]:
    """The processors a SampleConfig asks for, in the order that makes each mean what it says:
    history-based penalties first, then temperature, then the truncation rules."""
    chain: list[LogitsProcessor] = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size is not None:
        chain.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.temperature not in (0.0, 1.0):
        chain.append(Temperature(config.temperature))
    if config.top_k is not None:
        chain.append(TopK(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        chain.append(TopP(config.top_p))
    if config.min_p is not None:
        chain.append(MinP(config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        chain.append(TypicalP(config.typical_p))
    return chain
