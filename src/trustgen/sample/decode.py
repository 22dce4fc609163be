"""Token-level decoding: sampling or greedy (streamed step by step) and beam search.

Both drive any text family through its decoding (`trustgen.sample.kv_cache.decoding_for`:
`prefill(model, prompts, capacity) -> (logits, state)`, `decode_step(model, tokens, state) ->
logits`), so the loop does not care which family it drives. With
`use_cache=False` every step recomputes the whole sequence instead: slower, and the reference
the cached path must equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from trustgen.config import SampleConfig
from trustgen.errors import TrustgenError
from trustgen.sample.kv_cache import decoding_for
from trustgen.sample.processors import LogitsProcessor, apply_chain, chain_decides


def check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]]) -> None:
    limit = model.context_limit
    for prompt in prompts:
        if not prompt:
            raise TrustgenError("the prompt is empty; give at least one character.")
        if limit is not None and len(prompt) > limit:
            raise TrustgenError(f"the prompt is {len(prompt)} tokens long, longer than the model's "
                                f"context of {limit} tokens; shorten it.")


class _Decoder:
    """Holds the model state for a batch of rows and advances it one token at a time.

    A transformer's cache cannot outgrow its context; when it is full, the state is rebuilt from
    the most recent half-context of each row (a sliding window).
    """

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 use_cache: bool) -> None:
        self.model = model
        self.decoding = decoding_for(model)
        self.use_cache = use_cache
        self.limit = model.context_limit
        self.vocab = model.config.vocab_size
        device = next(model.parameters()).device
        longest = max(len(p) for p in prompts)
        self.total = longest + max_new_tokens
        # Every token so far, left-padded with `vocab`; it stays on the model's device and
        # doubles as it fills, so a generation that stops early never holds its maximum.
        self.history = torch.full((len(prompts), min(self.total, 2 * longest + 256)), self.vocab, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            self.history[row, longest - len(prompt): longest] = torch.tensor(prompt, dtype=torch.long)
        self.history = self.history.to(device)
        self.length = longest
        self.state: Any = None
        self.logits = self._recompute(keep=self.limit or longest)

    def rows(self, keep: int) -> list[list[int]]:
        return [[t for t in row if t < self.vocab][-keep:] for row in self.history[:, : self.length].tolist()]

    def _recompute(self, keep: int) -> torch.Tensor:
        # The cache holds what this generation can reach: all of it, or just the rows as they
        # are now when every step recomputes anyway.
        capacity = self.total if self.use_cache else self.length
        if self.limit is not None:
            capacity = min(capacity, self.limit)
        logits, self.state = self.decoding.prefill(self.model, self.rows(keep), capacity)
        return logits

    def record(self, tokens: torch.Tensor) -> None:
        """Append one token per row to the history, without running the model."""
        if self.length == self.history.shape[1]:
            room = min(self.history.shape[1], self.total - self.length)
            self.history = torch.cat((self.history, self.history.new_full((len(self.history), room), self.vocab)), 1)
        self.history[:, self.length] = tokens.to(self.history.device)
        self.length += 1

    def push(self, tokens: torch.Tensor) -> None:
        """Append one token per row and compute the logits that follow it."""
        tokens = tokens.to(self.history.device)
        self.record(tokens)
        if not self.use_cache:
            self.logits = self._recompute(keep=self.limit or self.length)
        elif self.limit is not None and self.state.length >= self.state.capacity:
            self.logits = self._recompute(keep=self.limit // 2)
        else:
            self.logits = self.decoding.decode_step(self.model, tokens, self.state)

    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.history.device)
        self.history = self.history.index_select(0, index)
        self.state.reorder(index)
        self.logits = self.logits.index_select(0, index)

    def scores(self, chain: Sequence[LogitsProcessor], vocab_size: int) -> torch.Tensor:
        return processed_scores(self.logits, self.history[:, : self.length], chain, vocab_size)


def processed_scores(logits: torch.Tensor, history: torch.Tensor, chain: Sequence[LogitsProcessor],
                     vocab_size: int) -> torch.Tensor:
    """Next-token scores (B, V) after the processor chain; ids past the tokenizer's vocabulary
    are removed."""
    scores = logits.float()
    if vocab_size < scores.shape[-1]:
        scores[:, vocab_size:] = -math.inf
    return apply_chain(chain, history, scores)


def choose_tokens(scores: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row (B,): the best, or a draw from the softmax of the scores.

    The draw inverts the cumulative distribution with one uniform per row. (torch.multinomial
    draws a random number per candidate: 90 µs a step at 4,096 candidates here, 7% of decoding.)
    Normalised, the last cumulative value is exactly 1 and u < 1, so the first index whose value
    exceeds u always exists and never has probability zero."""
    if greedy:
        return scores.argmax(dim=-1)
    cdf = scores.softmax(dim=-1).double().cumsum(dim=-1)
    cdf /= cdf[:, -1:].clone()
    u = torch.rand((len(scores), 1), generator=generator, dtype=torch.float64, device=scores.device)
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


@torch.inference_mode()
def sample_tokens(model: nn.Module, prompts: Sequence[Sequence[int]], config: SampleConfig,
                  chain: Sequence[LogitsProcessor], vocab_size: int,
                  generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), step by step, up to max_new_tokens steps."""
    check_prompts(model, prompts)
    decoder = _Decoder(model, prompts, config.max_new_tokens, config.use_cache)
    greedy = config.greedy or chain_decides(chain)
    for step in range(config.max_new_tokens):
        tokens = choose_tokens(decoder.scores(chain, vocab_size), greedy, generator)
        yield tokens
        if step + 1 < config.max_new_tokens:
            decoder.push(tokens)


@torch.inference_mode()
def beam_search(model: nn.Module, prompt: Sequence[int], config: SampleConfig,
                chain: Sequence[LogitsProcessor], vocab_size: int,
                is_finished: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The most likely continuation under beam search; scores are summed log-probabilities
    divided by length ** length_penalty (as in Wu et al. 2016 and Hugging Face)."""
    check_prompts(model, [prompt])
    beams = config.num_beams
    decoder = _Decoder(model, [prompt], config.max_new_tokens, config.use_cache)
    decoder.reorder(torch.zeros(beams, dtype=torch.long))
    start = decoder.length
    beam_scores = torch.full((beams,), -math.inf)
    beam_scores[0] = 0.0  # all beams start identical: expand only the first
    done: list[tuple[float, list[int]]] = []

    def normalised(score: float, length: int) -> float:
        return score / (length ** config.length_penalty)

    for step in range(config.max_new_tokens):
        log_probs = decoder.scores(chain, vocab_size).log_softmax(dim=-1).cpu()
        candidates = (beam_scores[:, None] + log_probs).flatten()
        top = torch.topk(candidates, 2 * beams)
        keep_beam, keep_token, keep_score = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if math.isinf(score):
                break
            beam, token = divmod(flat, log_probs.shape[-1])
            tokens = [*decoder.history[beam, start: decoder.length].tolist(), token]
            if is_finished is not None and is_finished(tokens):
                done.append((normalised(score, len(tokens)), tokens))
            else:
                keep_beam.append(beam)
                keep_token.append(token)
                keep_score.append(score)
            if len(keep_beam) == beams:
                break
        best_done = max((s for s, _ in done), default=-math.inf)
        if not keep_beam or (len(done) >= beams and best_done >= normalised(max(keep_score), step + 1)):
            break
        index = torch.tensor(keep_beam)
        beam_scores = torch.tensor(keep_score + [-math.inf] * (beams - len(keep_score)))
        index = torch.cat([index, index[:1].expand(beams - len(index))])
        decoder.reorder(index)
        tokens = torch.tensor(keep_token + keep_token[:1] * (beams - len(keep_token)))
        if step + 1 < config.max_new_tokens:
            decoder.push(tokens)
        else:
            decoder.record(tokens)
    for beam in range(beams):
        if not math.isinf(beam_scores[beam].item()):
            tokens = decoder.history[beam, start: decoder.length].tolist()
            done.append((normalised(beam_scores[beam].item(), max(len(tokens), 1)), tokens))
    return max(done, key=lambda item: item[0])[1]
