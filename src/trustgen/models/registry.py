"""Model families by name: each maps to its config class, its module class, the kind of data
it models, and the training settings that suit it better than the text defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from trustgen.config import Config
from trustgen.errors import TrustgenError
from trustgen.models.gan import GAN, GANConfig
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.rnn import CharRNN, RNNConfig
from trustgen.models.vae import VAE, VAEConfig


@dataclass(frozen=True)
class Family:
    config: type[Config]
    module: type[nn.Module]
    modality: Literal["text", "image"]
    train_defaults: dict[str, Any] = field(default_factory=dict)
    time_budget: str = "5m"  # when neither a step count nor a time budget is given
    # Model settings for new runs that differ from the config class's defaults, which keep what
    # older runs' configs meant; the second set only for runs not conditioned on classes.
    model_defaults: dict[str, Any] = field(default_factory=dict)
    unconditional_defaults: dict[str, Any] = field(default_factory=dict)


# The image defaults were chosen on built-in mnist with 10-minute budgets (bench/images.py).
_IMAGE_DEFAULTS = {"data": "mnist", "batch_size": 64, "weight_decay": 0.0, "grad_clip": 0.0,
                   "eval_interval": 500}
FAMILIES: dict[str, Family] = {
    "gpt": Family(GPTConfig, GPT, "text"),
    "rnn": Family(RNNConfig, CharRNN, "text"),
    "gan": Family(GANConfig, GAN, "image", {
        **_IMAGE_DEFAULTS, "learning_rate": 2e-3, "discriminator_lr": 2e-3, "min_learning_rate": 2e-4,
        "warmup_steps": 0, "beta1": 0.0, "beta2": 0.99}, "10m", unconditional_defaults={"clusters": 20, "calibrate": True}),
    "vae": Family(VAEConfig, VAE, "image", {
        **_IMAGE_DEFAULTS, "learning_rate": 2e-3, "min_learning_rate": 1e-4, "warmup_steps": 50}, "10m",
        {"prior": "mixture", "prior_components": 160, "fit_temperature": True, "calibrate": True, "width": 48}),
}


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise TrustgenError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}.") from None


def model_config(name: str, values: dict[str, Any]) -> Config:
    return family_of(name).config.from_dict(values)


def build_model(name: str, config: Config) -> nn.Module:
    return family_of(name).module(config)
