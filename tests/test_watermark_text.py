"""The KGW text watermark: found in its own output, not in human text nor under another key."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from trustgen.api import TextModel
from trustgen.data.text import shakespeare_documents
from trustgen.data.tokenizers import CharTokenizer
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.safety.watermark.text import (
    DETECT_ONLY,
    LEGACY_CONTEXT_WIDTHS,
    SCHEMES,
    GumbelWatermark,
    KGWWatermark,
    SynthIDWatermark,
    default_context_width,
    detect_windowed,
    key_id,
    make_watermark,
)

SECRET = b"a secret watermark key for tests"


@pytest.fixture(scope="module")
def human_text() -> str:
    plays = {d.name: d.text for d in shakespeare_documents()}
    return plays["hamlet"] + plays["macbeth"]


@pytest.fixture(scope="module")
def model(human_text: str) -> TextModel:
    tokenizer = CharTokenizer(human_text)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32)
    return TextModel(GPT(config), tokenizer, {"family": "gpt", "model": config.to_dict()}, torch.device("cpu"),
                     precision="fp32")


def watermarked(model: TextModel, secret: bytes, seed: int, scheme: Callable = KGWWatermark,
                tokens: int = 200) -> list[int]:
    """Token ids of a `tokens`-long continuation of "HAMLET:" watermarked with `scheme`."""
    mark = scheme(secret, model.tokenizer.vocab_size)
    text = model.generate("HAMLET:", max_new_tokens=tokens, seed=seed, processors=[mark])[0]
    return model.tokenizer.encode(text)


GREEN_LISTS = [SCHEMES["kgw"], DETECT_ONLY["kgw-selfhash"]]


@pytest.mark.parametrize("scheme", GREEN_LISTS)
def test_the_watermark_is_found_in_its_own_output(model: TextModel, scheme: Callable) -> None:
    mark = scheme(SECRET, model.tokenizer.vocab_size)
    for seed in range(5):
        result = mark.detect(watermarked(model, SECRET, seed, scheme))
        assert result.is_watermarked(1e-6), result.z_score
        assert result.green / result.scored > 0.5


@pytest.mark.parametrize("scheme", GREEN_LISTS)
def test_unwatermarked_output_and_another_key_are_not_flagged(model: TextModel, scheme: Callable) -> None:
    mark = scheme(SECRET, model.tokenizer.vocab_size)
    plain = model.tokenizer.encode(model.generate("HAMLET:", max_new_tokens=200, seed=1)[0])
    assert not mark.detect(plain).is_watermarked(0.01)
    other = watermarked(model, b"somebody else's key", 2, scheme)
    assert not mark.detect(other).is_watermarked(0.01)
    kgw, selfhash = (make(SECRET, model.tokenizer.vocab_size) for make in GREEN_LISTS)
    if mark.scheme == "kgw-selfhash":  # the same key seeded the other way is another watermark
        assert not kgw.detect(watermarked(model, SECRET, 3, DETECT_ONLY["kgw-selfhash"])).is_watermarked(0.01)
    else:
        assert not selfhash.detect(watermarked(model, SECRET, 3, SCHEMES["kgw"])).is_watermarked(0.01)


def test_self_hash_seeds_ignore_a_replaced_token_that_did_not_hold_the_minimum() -> None:
    mark = DETECT_ONLY["kgw-selfhash"](SECRET, 4000)
    keys = mark.hash._token_keys
    window = np.array([11, 22, 33, 44])  # three tokens of context, then the scored token
    smallest = int(np.argmin(keys[window]))
    replaced = next(i for i in range(len(window)) if i != smallest and i != len(window) - 1)
    heavier = next(t for t in range(4000) if keys[t] > keys[window].min() and t not in window)
    edited = window.copy()
    edited[replaced] = heavier
    assert mark.token_scores(window)[1].tolist() == mark.token_scores(edited)[1].tolist()
    # ...while a left hash over the same width changes with any context token
    left = KGWWatermark(SECRET, 4000, context_width=3)
    bits = [left.hash.scored_pairs(w)[1][0] for w in (window, edited)]
    assert bits[0] != bits[1]
    green = mark.green_mask(torch.randint(0, 4000, (64, 3)))
    assert abs(green.float().mean().item() - 0.25) < 0.01


@pytest.mark.parametrize("scheme", [SCHEMES["kgw"], DETECT_ONLY["kgw-selfhash"], SCHEMES["synthid"], GumbelWatermark])
def test_p_values_on_human_text_are_calibrated(model: TextModel, human_text: str, scheme: Callable) -> None:
    # With one key, the few frequent character pairs of English tilt every chunk the same way;
    # calibration holds over keys, so test 20 keys x 30 chunks.
    ids = model.tokenizer.encode(human_text)
    chunks = [ids[i: i + 200] for i in range(0, 200 * 30, 200)]
    p_values = np.array([scheme(b"key %d" % k, model.tokenizer.vocab_size).detect(chunk).p_value
                         for k in range(20) for chunk in chunks])
    # Under the null hypothesis about 1% of chunks fall below p = 0.01.
    assert (p_values < 0.01).mean() <= 0.03
    assert 0.3 < np.median(p_values) < 0.7


@pytest.mark.slow
@pytest.mark.parametrize("length", [31, 61, 151])
def test_kgw_p_values_are_exact_for_short_texts_too(length: int) -> None:
    """Random token sequences are human text with distinct pairs: each scored token is green
    with probability γ, independently. No more than 1% may fall below p = 0.01 (with the normal
    approximation's p-values, 1.5% did at 61 tokens and 1.4% at 151)."""
    mark = KGWWatermark(SECRET, 5000)
    rng = np.random.default_rng(0)
    p_values = np.array([mark.detect(rng.integers(0, 5000, length)).p_value for _ in range(20_000)])
    assert 0.004 <= (p_values < 0.01).mean() <= 0.011
    assert (p_values < 0.001).mean() <= 0.0012


@pytest.mark.parametrize("scheme", GREEN_LISTS)
def test_survives_substituting_a_fifth_of_the_tokens(model: TextModel, scheme: Callable) -> None:
    mark = scheme(SECRET, model.tokenizer.vocab_size)
    rng = np.random.default_rng(0)
    tokens = np.array(watermarked(model, SECRET, 3, scheme))
    edited = tokens.copy()
    positions = rng.choice(len(tokens), size=len(tokens) // 5, replace=False)
    edited[positions] = rng.integers(0, model.tokenizer.vocab_size, size=len(positions))
    assert mark.detect(edited).is_watermarked(0.01)


def test_repeated_text_does_not_inflate_the_score() -> None:
    mark = KGWWatermark(SECRET, vocab_size=50)
    once = mark.detect([1, 2, 3, 4, 5, 6])
    repeated = mark.detect([1, 2, 3, 4, 5, 6] * 20)
    assert repeated.scored == once.scored + 1  # only the new pair (6, 1) is added


def test_green_lists_depend_on_key_and_context_and_hold_gamma() -> None:
    a = KGWWatermark(SECRET, vocab_size=4000, gamma=0.25)
    b = KGWWatermark(b"other", vocab_size=4000, gamma=0.25)
    contexts = torch.tensor([[5], [6]])
    green = a.green_mask(contexts)
    assert abs(green.float().mean().item() - 0.25) < 0.03
    assert not torch.equal(green[0], green[1])
    assert not torch.equal(green, b.green_mask(contexts))
    assert key_id(SECRET) == a.key_id and SECRET.hex() not in a.key_id


def test_context_seeds_agree_for_a_few_rows_and_for_many() -> None:
    from trustgen.safety.watermark.text import SMALL_BATCH, KeyedHash

    keyed = KeyedHash(SECRET, vocab_size=4000, context_width=4)
    contexts = np.random.default_rng(0).integers(0, 4000, size=(SMALL_BATCH * 3, 4))
    few = np.concatenate([keyed.context_seeds(contexts[i: i + 4]) for i in range(0, len(contexts), 4)])
    assert np.array_equal(few, keyed.context_seeds(contexts))  # Python ints vs uint64 arrays
    assert len(set(few.tolist())) == len(contexts)


# -- SynthID-Text's tournament sampling (the distortion-free scheme) ---------------------------

def test_synthid_samples_differ_by_seed_and_row_and_each_is_found(model: TextModel) -> None:
    mark = SynthIDWatermark(SECRET, model.tokenizer.vocab_size)
    rows = model.generate("HAMLET:", n=3, max_new_tokens=200, seed=0, processors=[mark])
    other_seed = model.generate("HAMLET:", max_new_tokens=200, seed=1, processors=[mark])[0]
    assert len({*rows, other_seed}) == 4
    for text in [*rows, other_seed]:
        assert mark.detect(model.tokenizer.encode(text)).is_watermarked(1e-6)
    plain = model.tokenizer.encode(model.generate("HAMLET:", max_new_tokens=200, seed=1)[0])
    assert not mark.detect(plain).is_watermarked(0.01)
    other_key = model.tokenizer.encode(model.generate("HAMLET:", max_new_tokens=200, seed=2, processors=[
        SynthIDWatermark(b"somebody else's key", model.tokenizer.vocab_size)])[0])
    assert not mark.detect(other_key).is_watermarked(0.01)


def test_synthid_sampling_does_not_change_the_distribution_over_keys() -> None:
    from scipy.stats import chisquare

    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
    contexts = torch.tensor([[a, b] for a in range(8) for b in range(8)])
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(len(probs))
    for key in range(100):  # 6,400 draws: 100 keys x 64 two-token contexts, one draw each
        mark = SynthIDWatermark(b"key %d" % key, vocab_size=len(probs), context_width=2)
        tilted = mark(contexts, probs.log().expand(len(contexts), -1)).softmax(dim=-1)
        assert not torch.allclose(tilted, probs.expand_as(tilted), atol=0.05)  # each key does tilt
        counts += np.bincount(torch.multinomial(tilted, 1, generator=generator)[:, 0].numpy(), minlength=len(probs))
    assert chisquare(counts, probs.numpy() * counts.sum()).pvalue > 1e-3


def test_synthid_leaves_a_context_it_has_met_before_unwatermarked_and_keeps_removed_tokens_out() -> None:
    mark = SynthIDWatermark(SECRET, vocab_size=8, context_width=2)
    scores = torch.zeros(2, 8)
    scores[:, 5:] = -torch.inf  # truncated away by top-k or top-p
    history = torch.tensor([[1, 2, 3, 1, 2], [1, 2, 3, 4, 5]])  # row 0 ends in a context seen before
    out = mark(history, scores)
    assert torch.equal(out[0], scores[0])
    assert not torch.equal(out[1], scores[1]) and torch.isinf(out[1, 5:]).all() and torch.isfinite(out[1, :5]).all()


# -- the retired distortion-free exponential (Gumbel) scheme: detection of old text ---------------

def test_gumbel_is_found_in_its_own_output_and_not_elsewhere(model: TextModel) -> None:
    mark = GumbelWatermark(SECRET, model.tokenizer.vocab_size)
    assert mark.detect(watermarked(model, SECRET, 0, GumbelWatermark)).is_watermarked(1e-6)
    plain = model.tokenizer.encode(model.generate("HAMLET:", max_new_tokens=200, seed=1)[0])
    assert not mark.detect(plain).is_watermarked(0.01)
    assert not mark.detect(watermarked(model, b"another key", 2, GumbelWatermark)).is_watermarked(0.01)


def test_gumbel_sampling_does_not_change_the_distribution() -> None:
    from scipy.stats import chisquare

    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
    scores = probs.log().expand(1, -1)
    contexts = torch.tensor([[a, b] for a in range(8) for b in range(8)])
    counts = np.zeros(len(probs))
    for key in range(100):  # 6,400 independent draws: 100 keys x 64 two-token contexts
        mark = GumbelWatermark(b"key %d" % key, vocab_size=len(probs), context_width=2)
        chosen = mark(contexts, scores.expand(len(contexts), -1)).argmax(dim=-1)
        counts += np.bincount(chosen.numpy(), minlength=len(probs))
    expected = probs.numpy() * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3


def test_decoding_takes_the_gumbel_choice_without_drawing_again(model: TextModel, monkeypatch) -> None:
    from trustgen.sample import decode

    draws = []
    choose = decode.choose_tokens
    monkeypatch.setattr(decode, "choose_tokens", lambda scores, greedy, generator: draws.append(greedy)
                        or choose(scores, greedy, generator))
    mark = GumbelWatermark(SECRET, model.tokenizer.vocab_size)
    model.generate("HAMLET:", max_new_tokens=5, seed=0, processors=[mark])
    model.generate("HAMLET:", max_new_tokens=5, seed=0, processors=[KGWWatermark(SECRET, model.tokenizer.vocab_size)])
    assert draws == [True] * 5 + [False] * 5  # the Gumbel race is the draw; a green list is sampled from


@pytest.mark.parametrize("scheme", [KGWWatermark, SynthIDWatermark, GumbelWatermark])
def test_windowed_detection_finds_a_passage_inside_human_text(
        model: TextModel, human_text: str, scheme: type) -> None:
    mark = scheme(SECRET, model.tokenizer.vocab_size)
    human = model.tokenizer.encode(human_text[:20_000])
    found = 0
    for seed in range(5):
        passage = watermarked(model, SECRET, seed, scheme)
        start = 500 + 1000 * seed
        mixed = human[start: start + 500] + passage + human[start + 500: start + 1000]
        result = detect_windowed(mark, mixed, window=200)
        found += result.is_watermarked(0.01) and 400 <= result.start <= 600
    assert found >= 4
    for offset in range(0, 5000, 1000):  # plain human text stays quiet
        assert not detect_windowed(mark, human[offset: offset + 1200], window=200).is_watermarked(0.01)


def test_highlight_marks_each_scored_token() -> None:
    from trustgen.safety.watermark.text import highlight

    plain = highlight(["a", "b", "<c>"], [None, True, False])
    assert plain == "a\033[32mb\033[0m\033[31m<c>\033[0m"
    page = highlight(["a", "b", "<c>"], [None, True, False], html=True)
    assert 'a<span class="green">b</span><span class="red">&lt;c&gt;</span>' in page


def test_kgw_cached_green_lists_equal_fresh_ones() -> None:
    mark = KGWWatermark(b"k" * 32, vocab_size=50)
    history = torch.randint(0, 50, (6, 5))
    history[3, -1] = history[0, -1]  # a repeated context: served from the cache
    fresh = mark.delta * mark.green_mask(history).float()
    first = mark(history, torch.zeros(6, 50))
    again = mark(history, torch.zeros(6, 50))
    assert torch.equal(first, fresh) and torch.equal(again, fresh)


@pytest.mark.slow
def test_no_key_flags_much_more_human_text_with_recurring_ngrams_than_it_should(human_text: str) -> None:
    """Plays repeat speaker names, verse and phrases: the same n-grams recur in every chunk, so
    under one key they tilt every chunk the same way. At p < 0.01 no key of 20 may flag more
    than 2% of the chunks (with one character of context, one key flagged 4.6%)."""
    tokenizer = CharTokenizer(human_text)
    ids = tokenizer.encode(human_text)
    chunks = [ids[i: i + 200] for i in range(0, len(ids) - 200, 200)]
    for k in range(20):
        mark = make_watermark("kgw", b"key %d" % k, tokenizer.vocab_size)
        assert np.mean([mark.detect(chunk).p_value < 0.01 for chunk in chunks]) <= 0.02, k


def test_the_default_context_is_recorded_and_old_manifests_keep_theirs(tmp_path) -> None:
    from trustgen.safety.authenticity import _context_width
    from trustgen.safety.trust import Keys, TextTrust

    assert [default_context_width("kgw", v) for v in (65, 256, 4096)] == [4, 4, 3]
    trust = TextTrust(Keys(tmp_path / "keys", announce=None), model_id="m", family="gpt", vocab_size=65,
                      tokenizer_json=CharTokenizer("abc").to_json(), watermark="kgw")
    assert trust.claim()["watermark"]["context_width"] == 4 == trust.processors[0].hash.context_width
    assert _context_width({"scheme": "kgw", "key_id": "k"}) == LEGACY_CONTEXT_WIDTHS["kgw"] == 1
    assert _context_width({"scheme": "kgw", "context_width": 4}) == 4
    assert _context_width({"scheme": "kgw", "context_width": "4"}) is None and _context_width({}) is None
