"""Model families by name: each maps to its config class and its module class."""

from __future__ import annotations

from typing import Any

from torch import nn

from trustgen.config import Config
from trustgen.errors import TrustgenError
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.rnn import CharRNN, RNNConfig

FAMILIES: dict[str, tuple[type[Config], type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "rnn": (RNNConfig, CharRNN),
}


def family(name: str) -> tuple[type[Config], type[nn.Module]]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise TrustgenError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}.") from None


def model_config(name: str, values: dict[str, Any]) -> Config:
    config_class, _ = family(name)
    return config_class.from_dict(values)


def build_model(name: str, config: Config) -> nn.Module:
    _, model_class = family(name)
    return model_class(config)
