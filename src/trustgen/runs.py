"""Run directories and the objects they describe.

A run directory's `config.json` names the model family, its settings, the tokenizer kind, the
training settings and the run format version. This module writes and reads it, upgrades configs
of older formats to the current one (a field an older format lacked means what that format's
default was, `Family.legacy_defaults`), and builds the model a run directory holds through the
registry, with its weights and tokenizer.

Format versions: 1, the first; 2, the config dataclasses' defaults became those of new runs
(before, the registry overrode some: a VAE's width, prior and fitting, a GAN's clusters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trustgen import io
from trustgen.config import Config
from trustgen.data.tokenizers import Tokenizer, load_tokenizer
from trustgen.errors import TrustgenError
from trustgen.models.registry import family_of

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def write_run_config(run_dir: Path, family: str, model_config: Config, tokenizer_kind: str | None,
                     extra: dict[str, Any] | None = None) -> None:
    from trustgen import __version__

    io.write_json(Path(run_dir) / "config.json", {
        "format_version": FORMAT_VERSION,
        "trustgen_version": __version__,
        "family": family,
        "model": model_config.to_dict(),
        "tokenizer": tokenizer_kind,
        **(extra or {}),
    })


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json, upgraded to the current format: its "model" entry then holds every
    field of the family's config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrustgenError(f"{run_dir} is not a run directory (no such folder).")
    path = run_dir / "config.json"
    if not path.exists():
        raise TrustgenError(f"{run_dir} is not a trustgen run directory (it has no config.json).")
    config = io.read_json(path)
    if not isinstance(config, dict) or "family" not in config or not isinstance(config.get("model"), dict):
        raise TrustgenError(f"{path} is not a trustgen run config (foreign or corrupt).")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise TrustgenError(f"{path} has run format {version!r}; this trustgen reads formats "
                            f"{', '.join(map(str, READABLE_VERSIONS))}.")
    family = family_of(config["family"])
    model = family.make_config(config["model"], version).to_dict()
    return {**config, "format_version": FORMAT_VERSION, "model": model}


def load_run_model(run_dir: Path) -> tuple[torch.nn.Module, Tokenizer | None, dict[str, Any]]:
    """Build the model described by a run directory, with its weights and tokenizer (None for
    image models), and its (upgraded) config."""
    run_dir = Path(run_dir)
    io.recover(run_dir)
    config = read_run_config(run_dir)
    family = family_of(config["family"])
    model = family.build(family.make_config(config["model"]))
    io.load_weights(model, io.read_tensors(run_dir / "model.safetensors"), run_dir / "model.safetensors")
    if family.modality == "image":
        return model, None, config
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrustgenError(f"{run_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size}.")
    return model, tokenizer, config
