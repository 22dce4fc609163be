"""The contract every registered model family keeps, checked over the registry itself (as
scikit-learn's check_estimator runs over all estimators): a family registered without a tiny
config here fails the first test, so no family goes untested.

Built from its config through the registry, a family's model saves and loads to identical
outputs, is deterministic under a seed, samples in shape and range, keeps every parameter in
a leaf module (what Opacus needs for per-sample gradients), and through the real training loop
lowers its loss and resumes exactly.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import trustgen
from tests.conftest import tiny_corpus
from trustgen import io
from trustgen.config import SampleConfig
from trustgen.models.registry import FAMILIES, Family
from trustgen.sample.decode import sample_tokens
from trustgen.sample.kv_cache import decoding_for

VOCAB = 37
# The smallest settings of each family: enough to learn the tiny data in a few dozen steps.
TINY: dict[str, dict[str, Any]] = {
    "gpt": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16},
    "rnn": {"n_layer": 1, "hidden_size": 24, "embed_size": 8},
    "gan": {"image_size": 8, "latent_dim": 8, "width": 8, "max_width": 32, "clusters": 4},
    "vae": {"image_size": 8, "latent_dim": 4, "width": 8, "max_width": 32, "prior_components": 8},
}
# How each modality's tiny model is trained: data and settings for the real loop.
TRAINING = {
    "text": {"batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 0},
    "image": {"data": "digits", "batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 0},
}
STEPS = 40


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


def test_every_registered_family_has_a_tiny_config() -> None:
    assert set(FAMILIES) <= set(TINY), f"add a tiny config for {sorted(set(FAMILIES) - set(TINY))} to TINY"
    for name, family in FAMILIES.items():
        assert family.name == name and family.module.family == name
        assert family.modality in TRAINING


def build(family: Family, seed: int = 0) -> nn.Module:
    settings = TINY[family.name] if family.modality == "image" else {**TINY[family.name], "vocab_size": VOCAB}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return family.build(family.make_config(settings)).eval()


def outputs(model: nn.Module, family: Family, seed: int = 0) -> torch.Tensor:
    """What the model generates from fixed randomness: images, or next-token logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if family.modality == "image":
            return model.sample(6, generator=generator)
        prompts = torch.randint(VOCAB, (2, 9), generator=generator).tolist()
        logits, _ = decoding_for(model).prefill(model, prompts, capacity=16)
        return logits


def test_save_load_round_trip_gives_identical_outputs(family: Family, tmp_path: Path) -> None:
    model = build(family, seed=1)
    io.atomic_write_bytes(tmp_path / "model.safetensors", io.weights_bytes(model))
    other = build(family, seed=2)
    assert not torch.equal(outputs(model, family), outputs(other, family))
    io.load_weights(other, io.read_tensors(tmp_path / "model.safetensors"), tmp_path / "model.safetensors")
    assert torch.equal(outputs(model, family), outputs(other, family))


def test_deterministic_under_a_seed(family: Family) -> None:
    assert torch.equal(outputs(build(family, seed=5), family), outputs(build(family, seed=5), family))
    assert not torch.equal(outputs(build(family, seed=5), family), outputs(build(family, seed=6), family))
    model = build(family)
    assert torch.equal(outputs(model, family, seed=3), outputs(model, family, seed=3))
    assert not torch.equal(outputs(model, family, seed=3), outputs(model, family, seed=4))


def test_samples_have_the_promised_shape_and_range(family: Family) -> None:
    model = build(family)
    if family.modality == "image":
        config = model.config
        images = model.sample(5, generator=torch.Generator().manual_seed(0))
        assert images.shape == (5, config.channels, config.image_size, config.image_size)
        assert images.min() >= 0 and images.max() <= 1
        return
    config = SampleConfig(max_new_tokens=7, seed=0)
    steps = list(sample_tokens(model, [[1, 2, 3], [4]], config, [], VOCAB, torch.Generator().manual_seed(0)))
    assert len(steps) == 7 and all(t.shape == (2,) and t.min() >= 0 and t.max() < VOCAB for t in steps)


def test_every_parameter_lives_in_a_leaf_module(family: Family) -> None:
    # Opacus computes per-sample gradients per leaf module; a parameter on a container gets none.
    # A layer under a parametrization (spectral normalisation) is still one layer: its only
    # children are torch's parametrization containers, which hold the original weight.
    def is_layer(module: nn.Module) -> bool:
        return all(name == "parametrizations" for name, _ in module.named_children()) or isinstance(
            module, nn.utils.parametrize.ParametrizationList)

    model = build(family)
    misplaced = [f"{name}.{parameter}" for name, module in model.named_modules() if not is_layer(module)
                 for parameter, _ in module.named_parameters(recurse=False)]
    assert misplaced == []


def train_tiny(family: Family, root: Path, run: str, **settings: Any) -> Path:
    data = {} if family.modality == "image" else {"data": str(root / "data")}
    if family.modality == "text" and not (root / "data").exists():
        tiny_corpus(root / "data")
    shape = {k: v for k, v in TINY[family.name].items() if k != "image_size"}  # the data's (digits: 8)
    trustgen.train(root / run, model=family.name, model_config=shape, progress=False,
                   **{**TRAINING[family.modality], **data, **settings})
    return root / run


def loss_column(family: Family) -> str:
    return "d_loss" if family.objective == "adversarial" else "train_loss"


@pytest.mark.slow
def test_the_training_loop_lowers_the_loss_and_resumes_exactly(family: Family, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The run folder as it was when the mid-run checkpoint was committed: what a run killed
    # right after it leaves behind.
    halted = tmp_path / "halted"
    commit = io.commit_files

    def commit_and_keep_the_middle(folder: Path, files: dict[str, bytes]) -> None:
        commit(folder, files)
        if not halted.exists() and io.read_json(Path(folder) / "trainer_state.json")["step"] == STEPS // 2:
            shutil.copytree(folder, halted)

    monkeypatch.setattr(io, "commit_files", commit_and_keep_the_middle)
    straight = train_tiny(family, tmp_path, "straight", max_steps=STEPS, eval_interval=STEPS // 2, log_interval=5)
    monkeypatch.undo()
    with open(straight / "metrics.csv", newline="") as f:
        losses = [float(row[loss_column(family)]) for row in csv.DictReader(f) if row[loss_column(family)]]
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses

    trustgen.resume(halted, progress=False)
    a, b = io.read_tensors(straight / "model.safetensors"), io.read_tensors(halted / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
