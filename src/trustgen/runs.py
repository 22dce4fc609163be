"""Run directories and the objects they describe.

A run directory's `config.json` names the model family, its settings, the tokenizer kind, the
training settings and the run format version. This module writes and reads it, upgrades configs
of older formats to the current one (a field an older format lacked means what that format's
default was, `Family.legacy_defaults`), and builds the model a run directory holds through the
registry, with its weights and tokenizer.

Training a run (the second part) is orchestration over the layers below: prepare the data,
build the model from its settings through the registry (or from another run, to fine-tune),
write the run's config, fit it with the trainer, and draw an image model's pictures.

Format versions: 1, the first; 2, the config dataclasses' defaults became those of new runs
(before, the registry overrode some: a VAE's width, prior and fitting, a GAN's clusters).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustgen import io
from trustgen.config import Config, TrainConfig
from trustgen.data.prepare import prepare_data
from trustgen.data.tokenizers import Tokenizer, load_tokenizer
from trustgen.errors import TrustgenError
from trustgen.models.registry import build_model, family_of, model_config
from trustgen.runtime import private_rng, resolve_device
from trustgen.sample.images import write_run_pictures
from trustgen.training.checkpoint import read_trainer_state
from trustgen.training.data import image_training_data, text_training_data
from trustgen.training.trainer import Trainer, training_progress

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
log = logging.getLogger("trustgen")


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


def find_runs(folder: Path) -> list[dict[str, Any]]:
    """The run directories in `folder` (itself, its sub-folders and theirs), newest first: path,
    family, data, steps, validation loss (final, else best) and when it last changed. Reads only
    their JSON files; folders that are not runs are passed over."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrustgenError(f"{folder} is not a folder.")
    found = []
    for config_path in {folder / "config.json", *folder.glob("*/config.json"), *folder.glob("*/*/config.json")}:
        run_dir = config_path.parent
        try:
            config = read_run_config(run_dir)
        except TrustgenError:
            continue
        state = _json_or_empty(run_dir / "trainer_state.json")
        summary = _json_or_empty(run_dir / "summary.json")
        loss = summary.get("final_val_loss", state.get("best_val_loss"))
        changed = max(p.stat().st_mtime for p in run_dir.iterdir() if p.is_file() and p.name != io.LOCK)
        found.append({"run": str(run_dir), "family": config["family"], "data": config.get("train", {}).get("data"),
                      "steps": state.get("step"), "val_loss": loss, "changed": changed})
    return sorted(found, key=lambda run: -run["changed"])


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    content = io.read_json(path)
    return content if isinstance(content, dict) else {}


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


# == training a run ===========================================================================

IMAGE_SETTINGS_FROM_DATA = ("image_size", "channels", "n_classes")


TEXT_ONLY_SETTINGS = ("tokenizer", "vocab_size", "scrub_pii", "counterfactual_augment", "canaries")
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def training_family(model: str | None, settings: dict[str, Any]) -> str:
    """The family a new run with these (given) training settings trains: `model`, else that of
    the run it starts from (init_from), else gpt. Settings the run would ignore are refused
    with a sentence: a model or tokenizer other than the init_from run's, text settings for an
    image model, image_size for a text model, discriminator_lr for a family without one."""
    given = {k: v for k, v in settings.items() if v is not None}
    if given.get("init_from"):
        base = read_run_config(Path(given["init_from"]))
        if model is not None and model != base["family"]:
            raise TrustgenError(f"init_from {given['init_from']} holds a {base['family']} model; fine-tuning keeps "
                                f"it, so drop the model choice ({model}).")
        if family_of(base["family"]).modality == "text":  # an image run is refused by _train_text
            if given.get("tokenizer", base["tokenizer"]) != base["tokenizer"] or "vocab_size" in given:
                raise TrustgenError(f"init_from {given['init_from']} brings its own {base['tokenizer']} tokenizer; "
                                    "drop the tokenizer settings.")
            model = base["family"]
    family = family_of(model or "gpt")
    unused = [k for k in TEXT_ONLY_SETTINGS if family.modality == "image" and given.get(k, TRAIN_DEFAULTS[k])
              != TRAIN_DEFAULTS[k]]
    if family.modality == "text" and "image_size" in given:
        unused.append("image_size")
    if family.objective != "adversarial" and "discriminator_lr" in given:
        unused.append("discriminator_lr (--d-lr)")
    if unused:
        raise TrustgenError(f"{', '.join(unused)} do(es) not apply to a {family.name} model; leave it out.")
    return family.name


def train_run(out: str | Path, config: TrainConfig, family: str = "gpt",
              model_settings: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a new model into the run directory `out`; returns the summary (losses, steps).

    Image families take `conditional=True` among the model settings for a class-conditional
    model; the image size, channels and classes come from the data. The model's initial
    weights and its training draw from the run's seed on a private random stream: the
    caller's global random state is the same afterwards as before. The folder is locked while
    it trains (`io.folder_lock`); a start that fails before the run's config is written leaves
    nothing behind."""
    run_dir = Path(out)
    _refuse_existing(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    with io.folder_lock(run_dir):
        try:
            _refuse_existing(run_dir)  # again: another process may have started it meanwhile
            return _start(run_dir, config, family, model_settings, progress)
        finally:
            if not (run_dir / "config.json").exists():
                (run_dir / io.LOCK).unlink(missing_ok=True)
                if created and not any(run_dir.iterdir()):
                    run_dir.rmdir()


def _refuse_existing(run_dir: Path) -> None:
    if (run_dir / "config.json").exists():
        raise TrustgenError(f"{run_dir} already holds a run; continue it with trustgen train --resume {run_dir} "
                            "(trustgen.resume in Python) or choose another run directory.")


def _start(run_dir: Path, config: TrainConfig, family: str, model_settings: dict[str, Any] | None,
           progress: bool) -> dict[str, Any]:
    with private_rng(config.seed):
        device = resolve_device(config.device)
        if family_of(family).modality == "image":
            return _train_images(run_dir, config, family, dict(model_settings or {}), device, progress)
        return _train_text(run_dir, config, family, model_settings, device, progress)


def _train_text(run_dir: Path, config: TrainConfig, family: str, model_settings: dict[str, Any] | None,
                device: torch.device, progress: bool) -> dict[str, Any]:
    tokenizer = None
    if config.init_from:
        base, tokenizer, base_config = load_run_model(Path(config.init_from))
        if tokenizer is None:
            raise TrustgenError(f"init_from {config.init_from} holds a {base_config['family']} image model; "
                                "fine-tuning starts from a text run (gpt or rnn).")
        family = base_config["family"]
        if model_settings:
            raise TrustgenError("init_from takes the model settings from that run; don't give model settings too.")
        model_cfg = base.config
        config = config.replace(tokenizer=tokenizer.kind)  # what the run trains with, recorded as such
    prepared = prepare_data(config, tokenizer, progress=progress)
    if config.init_from:
        model = base
        _freeze(model, config.freeze_layers)
    else:
        settings = {**(model_settings or {}), "vocab_size": prepared.tokenizer.vocab_size}
        model_cfg = model_config(family, settings)
        model = build_model(family, model_cfg)
        if config.freeze_layers:
            raise TrustgenError("freeze_layers only makes sense with init_from.")
    data = text_training_data(prepared, model.config.block_size)
    wrap = _private_wrap(config, data, prepared)  # refuses bad privacy settings before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared.tokenizer.save(run_dir / "tokenizer.json")
    write_run_config(run_dir, family, model_cfg, prepared.tokenizer.kind, {"train": config.to_dict()})
    if prepared.canaries is not None:
        io.write_json(run_dir / "canaries.json", prepared.canaries)
    trainer = Trainer(run_dir, config, model, data, device, wrap=wrap)
    return _record_privacy(run_dir, trainer.fit(show_progress=progress))


def _train_images(run_dir: Path, config: TrainConfig, family: str, settings: dict[str, Any],
                  device: torch.device, progress: bool) -> dict[str, Any]:
    if config.init_from or config.freeze_layers:
        raise TrustgenError("fine-tuning (init_from, freeze_layers) is for text models.")
    check_image_settings(settings)
    kind = family_of(family)
    if config.private:
        if settings.get("conditional"):
            raise TrustgenError("private training of class-conditional image models is not supported; "
                                "drop conditional or dp_epsilon.")
        settings = required_settings(settings, kind.private_defaults, f"private {kind.name} training",
                                     "otherwise the model would fit the training images outside DP-SGD")
    data, classes, image_size, channels = image_training_data(config)
    model_cfg = image_model_config(family, settings, classes, image_size, channels, config.data)
    model = build_model(family, model_cfg)
    wrap = _private_wrap(config, data)  # refuses bad privacy settings before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, family, model_cfg, None, {"train": config.to_dict(), "classes": list(classes)})
    summary = Trainer(run_dir, config, model, data, device, wrap=wrap).fit(show_progress=progress)
    write_run_pictures(run_dir, model, data.val)
    return _record_privacy(run_dir, summary)


def check_image_settings(settings: dict[str, Any]) -> None:
    """Refuse image model settings that come from the data."""
    given = sorted(set(settings) & set(IMAGE_SETTINGS_FROM_DATA))
    if given:
        raise TrustgenError(f"{', '.join(given)} come(s) from the data; set the size with the training setting "
                            "image_size and use the model setting conditional=True for classes.")


def image_model_config(family: str, settings: dict[str, Any], classes: tuple[str, ...] | list[str],
                       image_size: int, channels: int, source: str) -> Config:
    """The config of a `family` image model for data of these classes, size and channels, from
    the model settings given (`conditional=True`: one class-conditional on the classes)."""
    check_image_settings(settings)
    settings = dict(settings)
    conditional = bool(settings.pop("conditional", False))
    if conditional and not classes:
        raise TrustgenError(f"the model setting conditional needs labelled images; {source} has no classes "
                            "(put each class's images in its own sub-folder).")
    defaults = family_of(family).conditional_defaults if conditional else {}
    return model_config(family, {**defaults, **settings, "image_size": image_size, "channels": channels,
                                 "n_classes": len(classes) if conditional else 0})


def required_settings(settings: dict[str, Any], required: dict[str, Any], who: str, why: str) -> dict[str, Any]:
    """`settings` with the `required` values, which a setting given otherwise must not contradict."""
    clash = sorted(k for k, v in required.items() if k in settings and settings[k] != v)
    if clash:
        wanted = ", ".join(f"{k}={required[k]!r}" for k in clash)
        raise TrustgenError(f"{who} needs {wanted}: {why}.")
    return {**settings, **required}


def _private_wrap(config: TrainConfig, data: Any, prepared: Any = None) -> Any:
    """The trainer's wrap hook for a private run (None otherwise)."""
    if not config.private:
        return None
    from trustgen.training import privacy

    if config.init_from:
        log.warning("private fine-tuning: the (epsilon, delta) guarantee covers the fine-tuning data only, "
                    f"not the data {config.init_from} was trained on.")
    return privacy.private_wrap(config, privacy.private_examples(config, data, prepared))


def _record_privacy(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A private run's config.json also records the guarantee it ended with."""
    if "privacy" in summary:
        run_config = io.read_json(run_dir / "config.json")
        io.write_json(run_dir / "config.json", {**run_config, "privacy": summary["privacy"]})
    return summary


def recorded_threads(run_dir: str | Path) -> int | None:
    """The CPU thread count a run's last checkpoint was trained with, when it says (older
    checkpoints do not); None for anything unreadable, which `resume_run` reports itself."""
    try:
        threads = io.read_json(Path(run_dir) / "trainer_state.json").get("threads")
    except (OSError, ValueError, AttributeError, TrustgenError):
        return None
    return threads if isinstance(threads, int) and threads >= 1 else None


def resume_run(run_dir: str | Path, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Continue a run from its last checkpoint, or start again in place a run stopped before
    its first one. `overrides` (max_steps, time_budget, device, checkpoint_interval) are checked
    before anything is written, and saved to config.json together with the resumed run's first
    checkpoint: a resume that fails changes nothing. A finished run is refused with a sentence
    unless the overrides extend it. The folder is locked while it trains; the random states
    come from the checkpoint, on a private stream, as in `train_run`."""
    run_dir = Path(run_dir)
    read_run_config(run_dir)  # a folder that is not a run gets its sentence before it is locked
    with io.folder_lock(run_dir):
        io.recover(run_dir)
        run_config = read_run_config(run_dir)
        checkpointed = (run_dir / "trainer_state.json").exists()
        if not checkpointed and ("train" not in run_config or (run_dir / "model.safetensors").exists()):
            raise TrustgenError(f"{run_dir} has no trainer state to resume from (was it imported?).")
        config = TrainConfig.from_run(run_config.get("train", {})).replace(**overrides)
        device = resolve_device(config.device)
        if not checkpointed:
            return _restart(run_dir, run_config, config, progress)
        _refuse_finished(run_dir, config)
        with private_rng():
            model, tokenizer, _ = load_run_model(run_dir)
            image = family_of(run_config["family"]).modality == "image"
            prepared = None
            if image:
                data, *_ = image_training_data(config)
            else:
                prepared = prepare_data(config, tokenizer, progress=progress)
                data = text_training_data(prepared, model.config.block_size)
            if config.init_from:
                _freeze(model, config.freeze_layers)
            trainer = Trainer(run_dir, config, model, data, device, wrap=_private_wrap(config, data, prepared))
            trainer.load_checkpoint()
            if overrides:
                trainer.pending_files["config.json"] = io.json_bytes({**run_config, "train": config.to_dict()})
            summary = trainer.fit(show_progress=progress)
            if image:
                write_run_pictures(run_dir, trainer.model, data.val)
            return _record_privacy(run_dir, summary)


def _restart(run_dir: Path, run_config: dict[str, Any], config: TrainConfig, progress: bool) -> dict[str, Any]:
    """Train again from step 0, with its recorded settings, a run that has no checkpoint yet."""
    log.info(f"{run_dir} stopped before its first checkpoint; training it again from step 0 with its settings.")
    family, model = run_config["family"], run_config["model"]
    settings = {k: v for k, v in model.items() if k not in IMAGE_SETTINGS_FROM_DATA}
    if family_of(family).modality == "image":
        settings["conditional"] = model["n_classes"] > 0
    return _start(run_dir, config, family, None if config.init_from else settings, progress)


def _refuse_finished(run_dir: Path, config: TrainConfig) -> None:
    state = read_trainer_state(run_dir)
    step, elapsed = state.get("step", 0), state.get("elapsed_s", 0.0)
    summary = _json_or_empty(run_dir / "summary.json")
    if training_progress(config, step, elapsed) >= 1.0 and summary.get("step") == step:
        raise TrustgenError(f"{run_dir} is finished ({step} steps, {elapsed:.0f}s of training); to train it further, "
                            "resume it with a larger --max-steps or --time-budget (max_steps, time_budget in Python).")


def _freeze(model: nn.Module, n_blocks: int) -> None:
    if n_blocks > model.n_blocks:
        raise TrustgenError(f"freeze_layers={n_blocks} is more than the model's {model.n_blocks} layers.")
    if n_blocks == 0:
        return
    for item in model.frozen_prefix(n_blocks):
        for p in item.parameters() if isinstance(item, nn.Module) else [item]:
            p.requires_grad_(False)


__all__ = ["FORMAT_VERSION", "find_runs", "load_run_model", "read_run_config", "resume_run", "train_run",
           "training_family", "write_run_config"]
