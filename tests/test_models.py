"""The shared suite every model family passes, plus family-specific checks."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trustgen import io
from trustgen.models import GPT, CharRNN, GPTConfig, RNNConfig, build_model
from trustgen.sample.kv_cache import KVCache, decoding_for

SMALLEST = {
    "gpt": GPTConfig(vocab_size=37, block_size=32, n_layer=2, n_head=2, n_embd=16,
                     position="learned", norm="layernorm", mlp="gelu"),
    "gpt-modern": GPTConfig(vocab_size=37, block_size=32, n_layer=2, n_head=2, n_embd=16,
                            position="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "rnn": RNNConfig(vocab_size=37, cell="rnn", n_layer=2, hidden_size=24, embed_size=8),
    "gru": RNNConfig(vocab_size=37, cell="gru", n_layer=1, hidden_size=24, embed_size=8),
    "lstm": RNNConfig(vocab_size=37, cell="lstm", n_layer=2, hidden_size=24, embed_size=8),
}
FAMILY = {"gpt": "gpt", "gpt-modern": "gpt", "rnn": "rnn", "gru": "rnn", "lstm": "rnn"}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(FAMILY[name], SMALLEST[name]).eval()


@pytest.fixture(params=list(SMALLEST))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_shapes(name: str) -> None:
    model = make(name)
    logits = model(torch.randint(37, (3, 11)))
    assert logits.shape == (3, 11, 37)


def test_save_load_round_trip_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    model = make(name, seed=1)
    io.atomic_write_bytes(tmp_path / "model.safetensors", io.weights_bytes(model))
    other = make(name, seed=2)
    x = torch.randint(37, (2, 9))
    assert not torch.equal(model(x), other(x))
    io.load_weights(other, io.read_tensors(tmp_path / "model.safetensors"), "model.safetensors")
    assert torch.equal(model(x), other(x))


def test_deterministic_under_a_seed(name: str) -> None:
    x = torch.randint(37, (2, 9))
    assert torch.equal(make(name, seed=5)(x), make(name, seed=5)(x))
    assert not torch.equal(make(name, seed=5)(x), make(name, seed=6)(x))


def test_a_few_dozen_steps_lower_the_loss(name: str) -> None:
    model = make(name).train()
    torch.manual_seed(0)
    pattern = torch.tensor([1, 5, 9, 3, 7, 2, 8] * 10)
    starts = torch.randint(0, 40, (8,))
    batch = torch.stack([pattern[s: s + 17] for s in starts])
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    first = loss().item()
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.5 * first


def test_cached_decoding_equals_full_recomputation(name: str) -> None:
    model = make(name)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    continuation = torch.randint(37, (3, 6))
    logits, state = decoding_for(model).prefill(model, prompts, capacity=20)
    for step in range(continuation.shape[1]):
        for row, prompt in enumerate(prompts):
            full = model(torch.tensor([prompt + continuation[row, :step].tolist()]))[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-5, rtol=1e-5)
        logits = decoding_for(model).decode_step(model, continuation[:, step], state)


def test_tied_embeddings_are_stored_once(tmp_path: Path) -> None:
    model = make("gpt")
    assert model.lm_head.weight is model.wte.weight
    tensors = io.tensors_from_bytes(io.weights_bytes(model), "weights")
    assert "lm_head.weight" not in tensors
    fresh = make("gpt", seed=3)
    io.load_weights(fresh, tensors, "weights")
    assert fresh.lm_head.weight is fresh.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.wte.weight)


def test_every_parameter_lives_in_a_leaf_module(name: str) -> None:
    # Per-sample-gradient tools (Opacus) only see parameters of leaf modules.
    model = make(name)
    for module in model.modules():
        if list(module.children()):
            assert not list(module.parameters(recurse=False)), type(module).__name__


def test_gpt_context_limit_and_kv_cache_capacity() -> None:
    model = make("gpt")
    _, cache = decoding_for(model).prefill(model, [[1, 2]], capacity=1000)
    assert isinstance(cache, KVCache)
    assert cache.capacity == model.config.block_size


def test_rnn_state_is_carried_between_steps() -> None:
    model: CharRNN = make("lstm")
    tokens = torch.tensor([[3, 4, 5, 6]])
    _, state = decoding_for(model).prefill(model, [[3]], capacity=0)
    carried = [decoding_for(model).decode_step(model, tokens[:, i], state) for i in range(1, 4)][-1]
    assert torch.allclose(carried, model(tokens)[:, -1], atol=1e-6)
    reset = model.head(model.rnn(model.embed(tokens[:, -1:]))[0])[:, -1]
    assert not torch.allclose(carried, reset)


def test_modern_gpt_options_change_the_architecture() -> None:
    modern: GPT = make("gpt-modern")
    assert modern.wpe is None and isinstance(modern.norm_f, torch.nn.RMSNorm)
    assert hasattr(modern.blocks[0].mlp, "gate")


@pytest.mark.parametrize("bad", [{"n_embd": 30, "n_head": 4}, {"n_layer": 0}, {"dropout": 1.5}, {"norm": "batch"}])
def test_bad_model_config_is_a_clear_error(bad: dict) -> None:
    from trustgen.errors import TrustgenError

    with pytest.raises(TrustgenError):
        GPTConfig.from_dict({"vocab_size": 10, **bad})
