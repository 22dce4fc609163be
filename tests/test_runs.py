"""Run directories: configs written by older run formats load as they meant, newer ones are refused."""

import re
from pathlib import Path

import pytest
import torch

from trustgen import io, runs
from trustgen.errors import TrustgenError
from trustgen.models import VAE, VAEConfig

# A format-1 VAE config as the first image runs wrote it: before the prior, its fitting and the
# wider default existed, so the fields are absent and mean the defaults of that time.
FORMAT_1_VAE = {"image_size": 8, "channels": 1, "n_classes": 0, "latent_dim": 4, "max_width": 32, "beta": 1.0,
                "decoder": "bernoulli"}


def write_format_1_run(folder: Path) -> VAE:
    folder.mkdir()
    model = VAE(VAEConfig(**FORMAT_1_VAE, width=32, prior="standard", fit_temperature=False, calibrate=False))
    io.atomic_write_bytes(folder / "model.safetensors", io.weights_bytes(model))
    io.write_json(folder / "config.json", {"format_version": 1, "trustgen_version": "0.1.0", "family": "vae",
                                           "model": FORMAT_1_VAE, "tokenizer": None})
    return model


def test_a_format_1_config_loads_with_the_defaults_of_its_time(tmp_path: Path) -> None:
    original = write_format_1_run(tmp_path / "old")
    model, tokenizer, config = runs.load_run_model(tmp_path / "old")
    assert tokenizer is None and config["format_version"] == runs.FORMAT_VERSION
    assert config["model"]["width"] == 32 and config["model"]["prior"] == "standard"
    assert not config["model"]["fit_temperature"] and not config["model"]["calibrate"]
    # New runs get the current defaults, which differ.
    assert VAEConfig().width == 48 and VAEConfig().prior == "mixture"
    generator = torch.Generator().manual_seed(0)
    expected = original.eval().sample(4, generator=generator)
    assert torch.equal(model.eval().sample(4, generator=torch.Generator().manual_seed(0)), expected)


def test_an_unknown_run_format_is_refused_with_a_sentence(tmp_path: Path) -> None:
    write_format_1_run(tmp_path / "future")
    config = io.read_json(tmp_path / "future" / "config.json")
    io.write_json(tmp_path / "future" / "config.json", {**config, "format_version": 99})
    with pytest.raises(TrustgenError, match="has run format 99; this trustgen reads formats 1, 2"):
        runs.read_run_config(tmp_path / "future")


def test_fine_tuning_from_an_image_run_is_refused_with_a_sentence(tmp_path: Path) -> None:
    import trustgen

    write_format_1_run(tmp_path / "vae")
    (tmp_path / "notes.txt").write_text("Some text to fine-tune on.\n" * 200)
    with pytest.raises(TrustgenError, match="holds a vae image model; fine-tuning starts from a text run"):
        trustgen.train(tmp_path / "tuned", data=str(tmp_path / "notes.txt"), init_from=str(tmp_path / "vae"),
                       max_steps=1, progress=False)
    assert not (tmp_path / "tuned").exists()


def test_a_run_folder_in_use_is_refused_naming_the_process(tmp_path: Path) -> None:
    import os

    write_format_1_run(tmp_path / "busy")
    with io.folder_lock(tmp_path / "busy"):
        assert (tmp_path / "busy" / io.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(TrustgenError, match=f"in use by another trustgen process \\(PID {os.getpid()}\\)"):
            runs.resume_run(tmp_path / "busy", progress=False)
    with pytest.raises(TrustgenError, match="no trainer state"):  # the lock went with its holder
        runs.resume_run(tmp_path / "busy", progress=False)


@pytest.mark.parametrize(("model", "settings", "words"), [
    ("gan", {"tokenizer": "bpe"}, "tokenizer do(es) not apply to a gan model"),
    ("vae", {"scrub_pii": True, "canaries": 3}, "scrub_pii, canaries do(es) not apply"),
    ("vae", {"discriminator_lr": 1e-3}, "--d-lr"),
    ("gpt", {"discriminator_lr": 1e-3}, "--d-lr"),
    (None, {"image_size": 32}, "image_size do(es) not apply to a gpt model"),
    ("rnn", {"init_from": "BASE"}, "holds a gpt model; fine-tuning keeps it"),
    (None, {"init_from": "BASE", "tokenizer": "char"}, "brings its own bpe tokenizer"),
    (None, {"init_from": "BASE", "vocab_size": 500}, "brings its own bpe tokenizer"),
])
def test_settings_a_run_would_ignore_are_refused(tmp_path: Path, model: str | None, settings: dict,
                                                 words: str) -> None:
    from trustgen.models import GPTConfig

    base = tmp_path / "base"
    base.mkdir()
    runs.write_run_config(base, "gpt", GPTConfig(vocab_size=300), "bpe", {"train": {}})
    settings = {k: str(base) if v == "BASE" else v for k, v in settings.items()}
    with pytest.raises(TrustgenError, match=re.escape(words)):
        runs.training_family(model, settings)
    # What does apply passes, and settings equal to their defaults are harmless.
    assert runs.training_family(None, {"init_from": str(base), "tokenizer": "bpe"}) == "gpt"
    assert runs.training_family("gan", {"discriminator_lr": 1e-3, "tokenizer": "char"}) == "gan"
