"""Logits processors, checked against their definitions on random scores (ties included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from trustgen.config import SampleConfig
from trustgen.errors import TrustgenError
from trustgen.sample.processors import (
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_chain,
    build_chain,
)

few = settings(max_examples=50, deadline=None)
TOL = 1e-5  # processors work in float32; the checks below work in float64

# Whole numbers make ties common; arbitrary floats cover the rest.
score_values = st.one_of(st.integers(-6, 6).map(float), st.floats(-20, 20, width=32))
probabilities = st.floats(0.01, 1.0)


@st.composite
def score_tensors(draw: st.DrawFn, min_vocab: int = 1, allow_neg_inf: bool = False) -> torch.Tensor:
    """A (B, V) float32 tensor of logits; optionally some -inf, but every row keeps one finite."""
    rows = draw(st.integers(1, 3))
    vocab = draw(st.integers(min_vocab, 12))
    values = draw(st.lists(st.lists(score_values, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    scores = torch.tensor(values, dtype=torch.float32)
    if allow_neg_inf:
        mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=vocab, max_size=vocab),
                                          min_size=rows, max_size=rows)))
        mask[:, draw(st.integers(0, vocab - 1))] = False
        scores = scores.masked_fill(mask, -math.inf)
    return scores


@st.composite
def histories(draw: st.DrawFn, rows: int, vocab: int, max_len: int = 12) -> torch.Tensor:
    """A (rows, T) history of ids below `vocab`, each row left-padded with PAD = vocab."""
    seqs = draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=max_len), min_size=rows, max_size=rows))
    width = max(1, max(len(s) for s in seqs))
    return torch.tensor([[vocab] * (width - len(s)) + s for s in seqs], dtype=torch.long)


def no_history(scores: torch.Tensor) -> torch.Tensor:
    return torch.zeros((scores.shape[0], 0), dtype=torch.long)


def kept(row: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(row)


def check_untouched(before: torch.Tensor, after: torch.Tensor) -> None:
    """A truncation rule only removes tokens: kept scores are unchanged, removed ones are -inf."""
    keep = kept(after)
    assert torch.equal(after[keep], before[keep])
    assert bool((after[~keep] == -math.inf).all())


# -- truncation rules ------------------------------------------------------------------------

@few
@given(scores=score_tensors(), p=probabilities)
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p(scores: torch.Tensor, p: float) -> None:
    out = TopP(p)(no_history(scores), scores)
    check_untouched(scores, out)
    probs = scores.double().softmax(dim=-1)
    for row in range(scores.shape[0]):
        keep = kept(out[row])
        kept_probs, dropped_probs = probs[row][keep], probs[row][~keep]
        mass = kept_probs.sum().item()
        assert keep.any()
        assert mass >= p - TOL
        # Minimal: without its least likely token the set no longer reaches p.
        assert mass - kept_probs.min().item() < p + TOL
        if dropped_probs.numel():
            assert kept_probs.min().item() >= dropped_probs.max().item()


def test_top_p_example() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = TopP(0.8)(no_history(scores), scores)
    assert kept(out[0]).tolist() == [True, True, False, False]
    out = TopP(0.81)(no_history(scores), scores)
    assert kept(out[0]).tolist() == [True, True, True, False]


@few
@given(scores=score_tensors(), k=st.integers(1, 14))
def test_top_k_keeps_the_k_highest(scores: torch.Tensor, k: int) -> None:
    out = TopK(k)(no_history(scores), scores)
    check_untouched(scores, out)
    vocab = scores.shape[-1]
    for row in range(scores.shape[0]):
        keep = kept(out[row])
        if k >= vocab:
            assert bool(keep.all())
            continue
        ranked = scores[row].sort(descending=True).values
        assert torch.equal(keep, scores[row] >= ranked[k - 1])
        if ranked[k - 1] > ranked[k]:  # no tie at the boundary
            assert int(keep.sum()) == k
        assert int(keep.sum()) >= k


@few
@given(scores=score_tensors(), p=probabilities)
@example(scores=torch.tensor([[2.0, 2.0, 1.0, 0.0]]), p=1.0)
def test_min_p_keeps_tokens_at_least_p_times_the_top(scores: torch.Tensor, p: float) -> None:
    out = MinP(p)(no_history(scores), scores)
    check_untouched(scores, out)
    probs = scores.double().softmax(dim=-1)
    for row in range(scores.shape[0]):
        keep = kept(out[row])
        threshold = p * probs[row].max().item()
        clearly_in = probs[row] >= threshold * (1 + TOL)
        clearly_out = probs[row] < threshold * (1 - TOL)
        assert bool(keep[clearly_in].all())
        assert not bool(keep[clearly_out].any())
        assert bool(keep[probs[row].argmax()])


def test_min_p_example() -> None:
    scores = torch.tensor([[0.5, 0.25, 0.201, 0.049]]).log()
    out = MinP(0.4)(no_history(scores), scores)  # threshold 0.2, just below the third token
    assert kept(out[0]).tolist() == [True, True, True, False]


@few
@given(scores=score_tensors(), p=probabilities)
def test_typical_p_keeps_the_most_typical_tokens_up_to_mass_p(scores: torch.Tensor, p: float) -> None:
    out = TypicalP(p)(no_history(scores), scores)
    check_untouched(scores, out)
    log_probs = scores.double().log_softmax(dim=-1)
    probs = log_probs.exp()
    for row in range(scores.shape[0]):
        keep = kept(out[row])
        assert keep.any()
        assert probs[row][keep].sum().item() >= p - TOL
        entropy = -(probs[row] * log_probs[row]).sum()
        distance = (-log_probs[row] - entropy).abs()
        if (~keep).any():
            assert distance[keep].max().item() <= distance[~keep].min().item() + 1e-4


def test_typical_p_prefers_tokens_near_the_entropy() -> None:
    # One dominant token and many rare ones: the entropy is low, so the dominant token is typical
    # and the rarest (most surprising) ones go first.
    probs = torch.tensor([[0.9, 0.05, 0.03, 0.02]])
    out = TypicalP(0.9)(no_history(probs), probs.log())
    assert kept(out[0]).tolist() == [True, False, False, False]


# -- reshaping rules -------------------------------------------------------------------------

@few
@given(scores=score_tensors(), t=st.floats(0.05, 20.0))
def test_temperature_scales_logits_and_preserves_the_argmax(scores: torch.Tensor, t: float) -> None:
    out = Temperature(t)(no_history(scores), scores)
    torch.testing.assert_close(out, scores / t)
    top = scores.argmax(dim=-1, keepdim=True)
    assert torch.equal(out.gather(-1, top).squeeze(-1), out.max(dim=-1).values)
    top_prob_before = scores.double().softmax(-1).max(-1).values
    top_prob_after = out.double().softmax(-1).max(-1).values
    if t < 1:
        assert bool((top_prob_after >= top_prob_before - TOL).all())  # sharper
    else:
        assert bool((top_prob_after <= top_prob_before + TOL).all())  # flatter


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_temperature_must_be_positive(t: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        Temperature(t)


@few
@given(data=st.data(), penalty=st.floats(1.01, 5.0))
def test_repetition_penalty_lowers_seen_tokens_only(data: st.DataObject, penalty: float) -> None:
    scores = data.draw(score_tensors(), label="scores")
    rows, vocab = scores.shape
    history = data.draw(histories(rows, vocab), label="history")
    out = RepetitionPenalty(penalty)(history, scores)
    probs_before = scores.double().softmax(-1)
    probs_after = out.double().softmax(-1)
    for row in range(rows):
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[[t for t in history[row].tolist() if t < vocab]] = True
        before, after = scores[row], out[row]
        assert torch.equal(after[~seen], before[~seen])
        expected = torch.where(before > 0, before / penalty, before * penalty)
        torch.testing.assert_close(after[seen], expected[seen])
        assert bool((after[seen] <= before[seen]).all())
        # Less probability on the seen tokens as a whole, more on the others.
        assert probs_after[row][seen].sum() <= probs_before[row][seen].sum() + TOL


def test_repetition_penalty_ignores_padding() -> None:
    vocab = 5
    scores = torch.tensor([[1.0, 2.0, -1.0, 3.0, 4.0], [1.0, 2.0, -1.0, 3.0, 4.0]])
    history = torch.tensor([[vocab, vocab, vocab, 0], [2, 2, 1, 0]])
    out = RepetitionPenalty(2.0)(history, scores)
    assert out[0].tolist() == [0.5, 2.0, -1.0, 3.0, 4.0]  # the last id (4) is not "seen" padding
    assert out[1].tolist() == [0.5, 1.0, -2.0, 3.0, 4.0]


def brute_force_banned(tokens: list[int], n: int) -> set[int]:
    """Tokens t such that tokens + [t] ends with an n-gram already present in tokens."""
    grams = {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}
    if len(tokens) < n - 1:
        return set()
    tail = tokens[len(tokens) - (n - 1):] if n > 1 else []
    return {g[-1] for g in grams if list(g[:-1]) == tail}


@few
@given(data=st.data(), n=st.integers(1, 4))
def test_no_repeat_ngram_bans_exactly_the_completing_tokens(data: st.DataObject, n: int) -> None:
    scores = data.draw(score_tensors(min_vocab=3), label="scores")
    rows, vocab = scores.shape
    history = data.draw(histories(rows, vocab, max_len=10), label="history")
    token_rows = [[t for t in row if t < vocab] for row in history.tolist()]
    banned = [brute_force_banned(tokens, n) for tokens in token_rows]
    assume(all(len(b) < vocab for b in banned))  # banning every token is tested on its own
    out = NoRepeatNGram(n)(history, scores)
    for row in range(rows):
        removed = {i for i in range(vocab) if out[row, i] == -math.inf and scores[row, i] != -math.inf}
        assert removed == banned[row]
        keep = [i for i in range(vocab) if i not in banned[row]]
        assert torch.equal(out[row, keep], scores[row, keep])


def test_no_repeat_ngram_example_with_padding() -> None:
    vocab = 6
    history = torch.tensor([[vocab, vocab, 1, 2, 3, 1, 2], [4, 1, 2, 5, 3, 1, 2]])
    out = NoRepeatNGram(3)(history, torch.zeros(2, vocab))
    assert (out[0] == -math.inf).nonzero().flatten().tolist() == [3]
    assert (out[1] == -math.inf).nonzero().flatten().tolist() == [5]
    assert bool((out[:, [0, 1, 2, 4]] == 0).all())


def test_no_repeat_ngram_never_bans_every_token() -> None:
    # Every one of the 3 tokens would repeat a 1-gram; sampling needs at least one left.
    history = torch.tensor([[0, 1, 2]])
    out = NoRepeatNGram(1)(history, torch.zeros(1, 3))
    assert bool(torch.isfinite(out).any())


# -- all processors ----------------------------------------------------------------------------

PROCESSORS = {
    "temperature": lambda: Temperature(0.7),
    "top_k": lambda: TopK(2),
    "top_p": lambda: TopP(0.5),
    "min_p": lambda: MinP(0.3),
    "typical_p": lambda: TypicalP(0.5),
    "repetition_penalty": lambda: RepetitionPenalty(1.5),
    "no_repeat_ngram": lambda: NoRepeatNGram(2),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
@few
@given(data=st.data())
def test_every_processor_keeps_a_finite_score_per_row(name: str, data: st.DataObject) -> None:
    scores = data.draw(score_tensors(allow_neg_inf=True), label="scores")
    rows, vocab = scores.shape
    history = data.draw(histories(rows, vocab), label="history")
    out = PROCESSORS[name]()(history, scores)
    assert out.shape == scores.shape
    assert not bool(out.isnan().any())
    assert bool(torch.isfinite(out).any(dim=-1).all())


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_processors_do_not_modify_their_input(name: str) -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 4.0, 1.0, 2.0]])
    original = scores.clone()
    history = torch.tensor([[5, 0, 1, 0], [2, 2, 2, 2]])
    PROCESSORS[name]()(history, scores)
    assert torch.equal(scores, original)


# -- the chain ---------------------------------------------------------------------------------

def test_build_chain_order_and_settings() -> None:
    config = SampleConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95,
                          repetition_penalty=1.3, no_repeat_ngram_size=3)
    chain = build_chain(config)
    assert [type(p) for p in chain] == [RepetitionPenalty, NoRepeatNGram, Temperature, TopK, TopP, MinP, TypicalP]
    penalty, ngram, temperature, top_k, top_p, min_p, typical_p = chain
    assert (penalty.penalty, ngram.n, temperature.temperature) == (1.3, 3, 0.8)
    assert (top_k.k, top_p.p, min_p.p, typical_p.p) == (40, 0.9, 0.05, 0.95)


@pytest.mark.parametrize("settings_", [
    {},
    {"temperature": 0.0},
    {"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0},
])
def test_build_chain_leaves_out_settings_that_change_nothing(settings_: dict) -> None:
    assert build_chain(SampleConfig(**settings_)) == []


def test_chain_applies_temperature_before_truncation() -> None:
    # At temperature 1 the top token alone reaches p=0.6; flattened by temperature 4 it does not,
    # so top-p must see the tempered distribution and keep more tokens.
    scores = torch.tensor([[4.0, 2.0, 1.0, 0.0]])
    history = no_history(scores)
    plain = apply_chain(build_chain(SampleConfig(top_p=0.6)), history, scores)
    tempered = apply_chain(build_chain(SampleConfig(top_p=0.6, temperature=4.0)), history, scores)
    assert int(kept(plain[0]).sum()) == 1
    assert int(kept(tempered[0]).sum()) > 1


def test_chain_penalises_before_truncating() -> None:
    # Token 0 leads but was already used; after the penalty top-k=1 must pick token 1.
    scores = torch.tensor([[3.0, 2.0, 0.0]])
    history = torch.tensor([[0]])
    out = apply_chain(build_chain(SampleConfig(top_k=1, repetition_penalty=2.0)), history, scores)
    assert kept(out[0]).tolist() == [False, True, False]


@pytest.mark.parametrize(("field", "value"), [
    ("top_p", 1.5), ("top_p", 0.0), ("temperature", -1.0), ("top_k", 0), ("min_p", -0.1),
    ("typical_p", 2.0), ("repetition_penalty", 0.0), ("no_repeat_ngram_size", 0),
])
def test_sample_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(TrustgenError, match=field):
        SampleConfig(**{field: value})
    with pytest.raises(TrustgenError, match=field):
        SampleConfig.from_dict({field: value})


def test_sample_config_rejects_unknown_fields() -> None:
    with pytest.raises(TrustgenError, match="top_q"):
        SampleConfig.from_dict({"top_q": 0.5})


def test_processors_work_on_a_batch_like_row_by_row() -> None:
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.normal(size=(4, 9)), dtype=torch.float32)
    history = torch.tensor([[9, 9, 1, 2], [3, 3, 3, 3], [9, 0, 8, 0], [1, 2, 1, 2]])
    for make in PROCESSORS.values():
        processor = make()
        together = processor(history, scores)
        alone = torch.cat([processor(history[i:i + 1], scores[i:i + 1]) for i in range(4)])
        assert torch.equal(together, alone)
