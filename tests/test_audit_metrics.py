"""Audit measures on inputs with known answers: diversity, the suffix-array index, copied spans,
--fail-on rules."""

import random

import numpy as np
import pytest

from trustgen.errors import TrustgenError
from trustgen.evaluate.audit import Summary, parse_rules
from trustgen.evaluate.memorization import CorpusIndex, copied_spans, suffix_array
from trustgen.evaluate.text import (
    distinct_n,
    human_chunks,
    ngram_entropy,
    repetition_rate,
    self_bleu,
    sequence_nll,
)


def test_distinct_n_of_a_repeated_string() -> None:
    text = "the cat " * 50
    assert distinct_n([text], 1) == pytest.approx(2 / 100)
    assert distinct_n([text], 2) == pytest.approx(2 / 99)  # "the cat" and "cat the"
    assert distinct_n(["a b c d e"], 1) == 1.0
    assert repetition_rate([text], 4) == pytest.approx(1 - 2 / 97)
    assert repetition_rate(["a b c d e f g"], 4) == 0.0


def test_self_bleu_of_identical_samples_is_one_and_of_unrelated_ones_near_zero() -> None:
    sample = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    assert self_bleu([sample] * 5) == pytest.approx(1.0)
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    unrelated = [" ".join(rng.choice(vocabulary) for _ in range(30)) for _ in range(6)]
    assert self_bleu(unrelated) < 0.05
    with pytest.raises(TrustgenError):
        self_bleu([sample])


def test_ngram_entropy_of_uniform_and_constant_text() -> None:
    assert ngram_entropy(["a b c d"], 1) == pytest.approx(2.0)
    assert ngram_entropy(["x x x x"], 1) == 0.0


def test_suffix_array_matches_sorting_every_suffix() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 4, 400)  # a small alphabet makes long ties, so doubling is exercised
    expected = sorted(range(len(codes)), key=lambda i: tuple(codes[i:]))
    assert suffix_array(codes, 4).tolist() == expected


def test_a_generator_that_copies_its_training_text_is_flagged() -> None:
    rng = random.Random(1)
    documents = ["".join(rng.choice("abcdefgh \n") for _ in range(3000)) for _ in range(3)]
    index = CorpusIndex(["one", "two", "three"], documents)
    copies = [documents[1][500:800], documents[2][100:400]]
    fresh = ["".join(rng.choice("abcdefgh \n") for _ in range(300)) for _ in range(2)]
    copied = copied_spans(index, copies)
    assert copied["memorized_fraction"] == 1.0
    assert copied["longest"]["length"] == 300 and copied["longest"]["document"] in {"two", "three"}
    assert copied["longest"]["text"] in documents[1] + documents[2]
    assert copied_spans(index, fresh)["memorized_fraction"] == 0.0
    # half copied, half not: a span across the seam is not in the corpus
    mixed = copied_spans(index, [documents[0][:150] + fresh[0][:150]])
    assert mixed["memorized_fraction"] == pytest.approx(101 / 251)
    summary = Summary(parse_rules("memorized_fraction>0.01"))
    summary.add("memorized_fraction", copied["memorized_fraction"], "copied")
    assert summary.rows[0]["flag"] and summary.failures()


def test_spans_never_match_across_documents_and_foreign_characters_never_match() -> None:
    index = CorpusIndex(["a", "b"], ["x" * 30, "y" * 30])
    assert copied_spans(index, ["x" * 30 + "y" * 30], span=50)["memorized_fraction"] == 0.0
    assert index.longest_match("xxxxΩ") == (4, index.longest_match("xxxxΩ")[1])


def test_fail_on_rules() -> None:
    rules = parse_rules("memorized_fraction>0.01, mia_auc >= 0.6,perplexity<3e1")
    assert [str(r) for r in rules] == ["memorized_fraction>0.01", "mia_auc>=0.6", "perplexity<30"]
    for bad in ("memorized_fraction", "x>>1", ">0.1", "mia_auc>high"):
        with pytest.raises(TrustgenError, match="--fail-on"):
            parse_rules(bad)
    summary = Summary(parse_rules("mia_auc>0.6,gender_gap>0.1"))
    summary.add("mia_auc", 0.55, "auc")
    assert summary.failures() == ["gender_gap>0.1 (not measured)"]


def test_human_chunks_have_the_requested_lengths_and_start_lines() -> None:
    text = "\n".join(f"line {i} " + "word " * (i % 7) for i in range(500))
    chunks = human_chunks([text], [40, 80, 10], seed=3)
    assert [len(c) for c in chunks] == [40, 80, 10]
    assert all(c.startswith("line ") for c in chunks)
    with pytest.raises(TrustgenError, match="shorter"):
        human_chunks(["short"], [100])


def test_windowed_scoring_matches_whole_scoring_when_the_text_fits() -> None:
    import torch

    from trustgen.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    small = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    large = GPT(GPTConfig(vocab_size=12, block_size=64, n_layer=1, n_head=2, n_embd=16, position="rope")).eval()
    large.load_state_dict(small.state_dict())
    seq = np.random.default_rng(0).integers(0, 12, 9).tolist()
    a, n = sequence_nll(small, [seq], scored_from=2)
    b, m = sequence_nll(large, [seq], scored_from=2)
    assert n[0] == m[0] == 7 and a[0] == pytest.approx(b[0], rel=1e-5)
    long_total, long_count = sequence_nll(small, [seq * 4], scored_from=2)  # beyond the context: windows
    assert long_count[0] == 34 and np.isfinite(long_total[0])
