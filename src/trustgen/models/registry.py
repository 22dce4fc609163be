"""Model families by name, and the contract every family keeps.

A family is a config class and a module class plus what the rest of trustgen needs to know
about them, so that no code outside `models/` tests a family's name:

- `modality`: what it models ("text": token windows, "image": images in [0, 1]);
- `decoding`: how a text family generates token by token ("attention": a key/value cache;
  "recurrent": a hidden state); `sample/kv_cache` maps the name to the code;
- `objective`: how training optimises it: "likelihood" (one optimizer minimising the module's
  own `loss(*batch) -> (loss, terms)`) or "adversarial" (the GAN game); `training/objectives`
  maps the name to the code;
- `start_training` / `finish_training`: post-hoc fitting the training loop runs, with batches
  of the training split, before the first step and after the last (a GAN's clusters, a VAE's
  mixture prior and temperature); they live beside the model file, not in it;
- the training settings and time budget that suit it better than the text defaults;
- `conditional_defaults`: model settings a class-conditional run gets instead of the config's
  defaults (a class-conditional GAN takes no self-conditioning clusters);
- `private_defaults`: model settings a differentially private run must have: whatever the family
  fits from the training data outside its gradient steps (clusters, mixture priors, calibration,
  a gradient penalty Opacus cannot clip per example) would leak data unaccounted;
- `federated_defaults`: model settings a federated run must have: what the family fits from the
  pooled training images (clusters, mixture priors, calibration), which no server holds;
- `local_state`: prefixes of state-dict keys that each data owner keeps to itself in federated
  training rather than averaging (a GAN's discriminator);
- `legacy_defaults`: for each older run format, the values that format's configs meant for
  fields they may lack (the defaults of their time), so old run directories load unchanged.

Every image module answers `sample(n, ...)`, every text module `forward(idx)` -> logits and
what its decoding needs, and every likelihood module `loss(*batch)`. The dataclass defaults of each config are
what a new run gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from trustgen.config import Config
from trustgen.errors import TrustgenError
from trustgen.models import gan_fitting, vae_fitting
from trustgen.models.gan import GAN, GANConfig
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.rnn import CharRNN, RNNConfig
from trustgen.models.vae import VAE, VAEConfig

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Fitting = Callable[[Any, Batches], None]


@dataclass(frozen=True)
class Family:
    name: str
    config: type[Config]
    module: type[nn.Module]
    modality: Literal["text", "image"]
    objective: Literal["likelihood", "adversarial"] = "likelihood"
    decoding: Literal["attention", "recurrent"] | None = None
    start_training: Fitting | None = None
    finish_training: Fitting | None = None
    train_defaults: dict[str, Any] = field(default_factory=dict)
    time_budget: str = "5m"  # when neither a step count nor a time budget is given
    conditional_defaults: dict[str, Any] = field(default_factory=dict)
    private_defaults: dict[str, Any] = field(default_factory=dict)
    federated_defaults: dict[str, Any] = field(default_factory=dict)
    local_state: tuple[str, ...] = ()
    legacy_defaults: dict[int, dict[str, Any]] = field(default_factory=dict)

    def build(self, config: Config) -> nn.Module:
        return self.module(config)

    def make_config(self, values: dict[str, Any], format_version: int | None = None) -> Config:
        """The config of `values` (a run config's "model" entry); values written by an older run
        format are first completed with what that format's defaults were."""
        legacy = self.legacy_defaults.get(format_version, {}) if format_version is not None else {}
        return self.config.from_dict({**legacy, **values})


# The image defaults were chosen on built-in mnist with 10-minute budgets (bench/images.py).
_IMAGE_DEFAULTS = {"data": "mnist", "batch_size": 64, "weight_decay": 0.0, "grad_clip": 0.0,
                   "eval_interval": 500}
FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", GPTConfig, GPT, "text", decoding="attention"),
    "rnn": Family("rnn", RNNConfig, CharRNN, "text", decoding="recurrent"),
    "gan": Family(
        "gan", GANConfig, GAN, "image", "adversarial",
        start_training=gan_fitting.fit_clusters, finish_training=gan_fitting.finish_training,
        train_defaults={**_IMAGE_DEFAULTS, "learning_rate": 2e-3, "discriminator_lr": 2e-3,
                        "min_learning_rate": 2e-4, "warmup_steps": 0, "beta1": 0.0, "beta2": 0.99},
        time_budget="10m", conditional_defaults={"clusters": 0},
        private_defaults={"clusters": 0, "calibrate": False, "r1_gamma": 0.0, "spectral_norm": False},
        federated_defaults={"clusters": 0, "calibrate": False}, local_state=("discriminator.",),
        # Format 1 configs were written with every field then known; these are the defaults of
        # fields added to format 1 without a version change.
        legacy_defaults={1: {"clusters": 0, "calibrate": False}}),
    "vae": Family(
        "vae", VAEConfig, VAE, "image",
        finish_training=vae_fitting.finish_training,
        train_defaults={**_IMAGE_DEFAULTS, "learning_rate": 2e-3, "min_learning_rate": 1e-4, "warmup_steps": 50},
        time_budget="10m",
        private_defaults={"prior": "standard", "fit_temperature": False, "calibrate": False},
        federated_defaults={"prior": "standard", "fit_temperature": False, "calibrate": False},
        legacy_defaults={1: {"width": 32, "prior": "standard", "prior_components": 10, "fit_temperature": False,
                             "calibrate": False}}),
}


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise TrustgenError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}.") from None


def model_config(name: str, values: dict[str, Any]) -> Config:
    return family_of(name).make_config(values)


def build_model(name: str, config: Config) -> nn.Module:
    return family_of(name).build(config)
