"""Decoding: cache equivalence, batching, long generation, stop strings, streaming, beams, seeds."""

import math

import pytest
import torch

from trustgen.api import TextModel
from trustgen.data.tokenizers import ByteTokenizer, CharTokenizer
from trustgen.errors import TrustgenError
from trustgen.models import build_model
from trustgen.models.gpt import GPTConfig
from trustgen.models.rnn import RNNConfig

CHARS = "abcdefghijklmnopqrstuvwxyz \n:"


def text_model(family: str = "gpt", tokenizer=None, block_size: int = 24, precision: str = "fp32") -> TextModel:
    tokenizer = tokenizer or CharTokenizer(CHARS)
    torch.manual_seed(0)
    if family == "gpt":
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    else:
        config = RNNConfig(vocab_size=tokenizer.vocab_size, cell="gru", hidden_size=16, embed_size=8)
    model = build_model(family, config)
    return TextModel(model, tokenizer, {"family": family, "model": config.to_dict()}, torch.device("cpu"),
                     precision=precision)


class Script:
    """A processor that forces a fixed sequence of tokens (to test the text layer exactly)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.step = 0

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.tokens[min(self.step, len(self.tokens) - 1)]] = 0.0
        self.step += 1
        return forced


@pytest.mark.parametrize("family", ["gpt", "rnn"])
@pytest.mark.parametrize("settings", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}])
def test_cached_decoding_gives_the_same_tokens_as_full_recomputation(family: str, settings: dict) -> None:
    model = text_model(family)
    prompts = ["ab", "hij a:", "c"]
    # 6 + 18 tokens fill the 24-token context exactly: every step is inside the window.
    cached = model.generate(prompts, max_new_tokens=18, use_cache=True, **settings)
    full = model.generate(prompts, max_new_tokens=18, use_cache=False, **settings)
    assert cached == full


@pytest.mark.parametrize("family", ["gpt", "rnn"])
def test_batched_prompts_of_different_lengths_match_single_prompts(family: str) -> None:
    model = text_model(family)
    prompts = ["a", "abcdefg hij", "ee:"]
    # 11 + 13 tokens stay inside the 24-token context, where batching must change nothing.
    batched = model.generate(prompts, max_new_tokens=13, temperature=0)
    assert batched == [model.generate(p, max_new_tokens=13, temperature=0)[0] for p in prompts]


def test_generation_longer_than_the_context_slides_the_window() -> None:
    model = text_model("gpt", block_size=16)
    out = model.generate("abc", max_new_tokens=60, temperature=0)[0]
    assert len(out) == 60
    # Within the context the cache must agree with full recomputation.
    assert out[:13] == model.generate("abc", max_new_tokens=13, temperature=0, use_cache=False)[0]


def test_prompt_longer_than_the_context_is_a_clear_error() -> None:
    model = text_model("gpt", block_size=8)
    with pytest.raises(TrustgenError, match="longer than the model's context"):
        model.generate("abcdefghij", max_new_tokens=2)


def test_sampled_tokens_follow_the_distribution_and_never_take_a_zero_probability_token() -> None:
    from scipy.stats import chisquare

    from trustgen.sample.decode import choose_tokens

    probs = torch.tensor([0.45, 0.0, 0.3, 0.15, 0.07, 0.03, 0.0])  # the last one: a masked id at the end
    scores = probs.log().expand(40_000, -1).contiguous()
    drawn = choose_tokens(scores, greedy=False, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=len(probs)).double()
    assert counts[1] == 0 and counts[-1] == 0
    positive = probs > 0
    assert chisquare(counts[positive].numpy(), (probs[positive] * len(drawn)).double().numpy()).pvalue > 1e-3
    again = choose_tokens(scores[:5], greedy=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, drawn[:5])  # a seed fixes the draws


def test_same_seed_same_text_and_other_seed_other_text() -> None:
    model = text_model()
    first = model.generate("ab", n=2, max_new_tokens=30, seed=7)
    assert first == model.generate("ab", n=2, max_new_tokens=30, seed=7)
    assert first != model.generate("ab", n=2, max_new_tokens=30, seed=8)


def test_stop_strings_end_the_sample_and_are_not_included() -> None:
    model = text_model()
    tok = model.tokenizer
    script = Script(tok.encode("hello: world") + tok.encode("zz"[:0] or "a"))
    out = model.generate("a", max_new_tokens=20, temperature=0, stop=(" wo",), processors=[script])
    assert out == ["hello:"]


def test_stream_holds_back_a_partial_stop_string() -> None:
    model = text_model()
    tok = model.tokenizer
    pieces = list(model.stream("a", max_new_tokens=20, temperature=0, stop=(": w",),
                               processors=[Script(tok.encode("he:a: wx"))]))
    assert "".join(pieces) == "he:a"
    assert all(": w"[:2] not in p for p in pieces)


def test_stream_equals_generate_for_the_same_seed() -> None:
    model = text_model()
    streamed = "".join(model.stream("ab", max_new_tokens=40, seed=11, top_k=5))
    assert streamed == model.generate("ab", max_new_tokens=40, seed=11, top_k=5)[0]


def test_streaming_never_splits_a_multibyte_character() -> None:
    model = text_model("gpt", tokenizer=ByteTokenizer())
    target = "héllo 中文 😀!"
    pieces = list(model.stream("a", max_new_tokens=len(target.encode()), temperature=0,
                               processors=[Script(list(target.encode()))]))
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces)
    assert "中" in pieces and "😀" in pieces


def sequence_log_prob(model: TextModel, prompt: str, continuation: str) -> float:
    ids = model.tokenizer.encode(prompt + continuation)
    with torch.no_grad():
        logits = model.model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    start = len(model.tokenizer.encode(prompt)) - 1
    return sum(logits[i, ids[i + 1]].item() for i in range(start, len(ids) - 1))


@pytest.mark.parametrize("family", ["gpt", "rnn"])
def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(family: str) -> None:
    model = text_model(family)
    greedy = model.generate("ab", max_new_tokens=8, temperature=0)[0]
    beam = model.generate("ab", max_new_tokens=8, num_beams=4, length_penalty=0.0)[0]
    assert len(beam) == 8
    assert sequence_log_prob(model, "ab", beam) >= sequence_log_prob(model, "ab", greedy) - 1e-5
    assert model.generate("ab", max_new_tokens=8, num_beams=1, temperature=0)[0] == greedy


def test_beam_search_respects_stop_strings() -> None:
    model = text_model()
    out = model.generate("ab", max_new_tokens=30, num_beams=3, stop=("a",))[0]
    assert "a" not in out


def test_unknown_prompt_characters_and_bad_settings_are_clear_errors() -> None:
    model = text_model()
    with pytest.raises(TrustgenError, match="never saw"):
        model.generate("XYZ")
    with pytest.raises(TrustgenError, match="top_p"):
        model.generate("ab", top_p=1.5)
    with pytest.raises(TrustgenError, match="temperature"):
        model.generate("ab", temperature=-1)
    with pytest.raises(TrustgenError, match="empty"):
        model.generate("")
    with pytest.raises(TrustgenError, match="beam"):
        list(model.stream("ab", num_beams=2))


@pytest.mark.parametrize("family", ["gpt", "rnn"])
def test_bf16_inference_keeps_the_greedy_choice_of_a_confident_model(family: str) -> None:
    exact = text_model(family, precision="fp32")
    fast = text_model(family, precision="bf16")
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    # Sharpen the read-out so that bf16 rounding cannot flip the greedy choice.
    with torch.no_grad():
        for model in (exact.model, fast.model):
            head = model.lm_head if family == "gpt" else model.head
            head.weight.mul_(20)
    assert fast.generate("ab", max_new_tokens=12, temperature=0) == exact.generate("ab", max_new_tokens=12, temperature=0)
    with pytest.raises(TrustgenError, match="precision"):
        text_model(precision="fp16")


@pytest.mark.parametrize("in_features", [64, 42, 8])  # 42 and 8 need padding for the kernel
def test_int8_linear_matches_its_dequantized_weights(in_features: int) -> None:
    from trustgen.compress.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 48)
    quantized = Int8Linear(linear)
    assert quantized.weight.dtype == torch.int8
    dequantized = quantized.weight[:, :in_features].float() * quantized.scales.float()[:, None]
    # Rounding moves each weight by at most half a step of its channel's scale.
    step = quantized.scales.float()[:, None]
    assert ((dequantized - linear.weight).abs() <= 0.51 * step).all()
    x = torch.randn(5, 7, in_features)
    expected = x.to(torch.bfloat16).float() @ dequantized.T + linear.bias
    torch.testing.assert_close(quantized(x).float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("family", ["gpt", "rnn"])
def test_int8_inference_stays_close_to_fp32(family: str) -> None:
    exact = text_model(family, precision="fp32")
    small = text_model(family, precision="int8")
    assert small.precision == "int8" and small.info()["parameters"] == exact.info()["parameters"]
    contexts = torch.randint(len(CHARS), (32, 12))
    with torch.no_grad():
        p = exact.model(contexts)[:, -1].float().softmax(-1)
        q = small.model(contexts)[:, -1].float().softmax(-1)
    total_variation = 0.5 * (p - q).abs().sum(-1)
    assert total_variation.max() < 0.05
    assert len(small.generate("ab", max_new_tokens=6, seed=1)[0]) == 6


def test_a_generous_token_limit_holds_only_what_is_generated() -> None:
    """The history grows with the text rather than being allocated for max_new_tokens up front
    (5,000,000,000 tokens once asked for 40 GB)."""
    from trustgen.sample.decode import _Decoder

    model = text_model()
    decoder = _Decoder(model.model, [[1, 2, 3]], 1_000_000, use_cache=True)
    assert decoder.history.shape[1] < 1000
    for token in range(600):
        decoder.push(torch.tensor([token % 20]))
    assert decoder.history[0, 3:603].tolist() == [t % 20 for t in range(600)]
    assert decoder.history.shape[1] < 2000


def test_absurd_lengths_are_refused_with_the_limit() -> None:
    with pytest.raises(TrustgenError, match="at most 1,000,000 per sample"):
        text_model().generate("ab", max_new_tokens=5_000_000_000)
