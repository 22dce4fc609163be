"""The Python API: `train`, `resume`, `load`; a loaded `TextModel` generates and streams text,
a loaded `ImageModel` generates images, walks its latent space and measures its samples.

Everything the CLI does goes through these functions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustgen import io, runs
from trustgen.compress.quantize import quantize_int8
from trustgen.config import SampleConfig, TrainConfig, parse_duration
from trustgen.data.images import load_images, split_images
from trustgen.data.tokenizers import Tokenizer
from trustgen.errors import TrustgenError
from trustgen.models.registry import family_of
from trustgen.runtime import bf16_is_fast, resolve_device
from trustgen.safety.policy import Finding, Policy
from trustgen.sample.decode import beam_search, sample_tokens
from trustgen.sample.images import PICTURES, interpolate, label_for_prompt, sample_images, to_uint8
from trustgen.sample.processors import LogitsProcessor, build_chain

DEFAULT_PROMPT = "\n"
PRECISIONS = ("auto", "fp32", "bf16", "int8")
log = logging.getLogger("trustgen")


def train_config(settings: dict[str, Any], family: str = "gpt") -> TrainConfig:
    """A validated TrainConfig from keyword settings over the family's defaults; durations may
    be written like "5m". With neither max_steps nor time_budget, the family's time budget."""
    chosen = family_of(family)
    settings = {**chosen.train_defaults, **{k: v for k, v in settings.items() if v is not None}}
    if settings.get("max_steps") is None and settings.get("time_budget") is None:
        settings["time_budget"] = chosen.time_budget
    budget = settings.get("time_budget")
    if isinstance(budget, str):
        settings["time_budget"] = parse_duration(budget)
    return TrainConfig.from_dict(settings)


def train(out: str | Path, *, model: str = "gpt", model_config: dict[str, Any] | None = None,
          progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Train a model into the run directory `out`.

    `model`: gpt or rnn (text), gan or vae (images). `settings` are TrainConfig fields (data,
    tokenizer, image_size, max_steps, time_budget="5m", ...) over the family's defaults; with
    neither max_steps nor time_budget, text trains for 5 minutes and images for 10.
    `model_config` holds the family's own fields (n_layer, n_embd, cell, latent_dim, beta, ...;
    conditional=True for a class-conditional image model).
    Returns the summary: steps, elapsed seconds, final and best validation loss (None for a GAN).
    """
    return runs.train_run(out, train_config(settings, model), model, model_config, progress=progress)


def resume(run_dir: str | Path, *, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Continue a run from its last checkpoint (overrides may extend max_steps or time_budget)."""
    if isinstance(overrides.get("time_budget"), str):
        overrides["time_budget"] = parse_duration(overrides["time_budget"])
    return runs.resume_run(run_dir, progress=progress, **overrides)


def load(run_dir: str | Path, device: str = "auto", precision: str = "auto") -> TextModel | ImageModel:
    """Load a trained model from its run directory: a TextModel or an ImageModel.

    precision (text): "fp32", "bf16", "auto" = bf16 where the hardware multiplies bf16
    natively, or "int8" = weight-only int8 (fastest on CPUs, slightly lossy). Image models
    sample in fp32.
    """
    model, tokenizer, config = runs.load_run_model(Path(run_dir))
    if tokenizer is None:
        return ImageModel(model, config, resolve_device(device), Path(run_dir))
    return TextModel(model, tokenizer, config, resolve_device(device), Path(run_dir), precision)


def is_image_run(run_dir: str | Path) -> bool:
    """Whether a run directory holds an image model (reads only its config)."""
    return family_of(runs.read_run_config(Path(run_dir))["family"]).modality == "image"


def audit(run_dir: str | Path, *, samples: int = 500, max_new_tokens: int = 200, temperature: float = 1.0,
          top_p: float | None = None, seed: int = 0, fail_on: str | None = None, out: str | Path | None = None,
          device: str = "auto", canary_candidates: int = 10_000, extraction_prompts: int = 100,
          mia_examples: int = 1000, heldout_tokens: int = 200_000, fairness: bool = True,
          progress: bool = False) -> dict[str, Any]:
    """Audit a run: quality, diversity, memorization, canary exposure, membership inference and
    fairness of a text model; image metrics and class balance of an image model.

    Writes `out` (default RUN/audit)/report.json and report.html and returns the report. Its
    "summary" rows (name, value, human-text reference, threshold, flag) are what `fail_on`
    rules ("memorized_fraction>0.01,mia_auc>0.6") are checked against; the crossed ones are
    listed in report["failed"]. See trustgen.evaluate.audit.
    """
    import datetime

    from trustgen import __version__
    from trustgen.evaluate import audit as auditing

    rules = auditing.parse_rules(fail_on)  # before any work: a typo should not cost minutes
    run_dir = Path(run_dir)
    model = load(run_dir, device=device)
    report_log = (lambda message: log.info(f"audit: {message}")) if progress else (lambda _: None)
    if isinstance(model, ImageModel):
        report, figures = auditing.audit_images(model, run_dir, rules, samples=samples, seed=seed, log=report_log)
    else:
        report, figures = auditing.audit_text(
            model, run_dir, rules, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, candidates=canary_candidates, extraction_prompts=extraction_prompts,
            mia_examples=mia_examples, heldout_tokens=heldout_tokens, fairness=fairness, log=report_log)
    report = {"run": str(run_dir), "model_id": io.file_sha256(run_dir / "model.safetensors"),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "trustgen_version": __version__, **report}
    report["paths"] = [str(p) for p in auditing.write(report, Path(out) if out else run_dir / "audit", figures)]
    return report


def run_summary(run_dir: Path | None, run_config: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """What every run shows: family, settings, size, training state, losses and model id."""
    summary: dict[str, Any] = {
        "family": run_config["family"],
        "model": run_config["model"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trustgen_version": run_config.get("trustgen_version"),
        "model_id": io.file_sha256(run_dir / "model.safetensors") if run_dir else io.weights_sha256(model),
    }
    if run_dir is None:
        return summary
    state_path = run_dir / "trainer_state.json"
    if state_path.exists():
        state = io.read_json(state_path)
        summary.update(step=state.get("step"), data=state.get("data"), training_seconds=state.get("elapsed_s"),
                       best_val_loss=state.get("best_val_loss"))
        for unit in ("tokens_seen", "images_seen"):
            if unit in state:
                summary[unit] = state[unit]
    final_path = run_dir / "summary.json"
    if final_path.exists():
        final = io.read_json(final_path)
        summary["final_val_loss"] = final.get("final_val_loss")
        best = [v for v in (summary.get("best_val_loss"), final.get("best_val_loss")) if v is not None]
        summary["best_val_loss"] = min(best) if best else None
    for key in ("train", "source", "classes"):
        if key in run_config:
            summary[key] = run_config[key]
    return summary


class TextModel:
    """A trained text model and its tokenizer: generate, stream, describe."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, run_config: dict[str, Any],
                 device: torch.device, run_dir: Path | None = None, precision: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise TrustgenError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        self.n_parameters = sum(p.numel() for p in model.parameters())
        # Decoding one token at a time reads every weight per token: bf16 halves that traffic
        # and, for small models, lets the weights stay in the CPU's cache; int8 (weight-only,
        # slightly lossy, so never automatic) quarters it.
        if precision == "auto":
            precision = "bf16" if bf16_is_fast(device) else "fp32"
        self.precision = precision
        if precision == "int8":
            model = quantize_int8(model.float())
        else:
            model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.run_config = run_config
        self.device = device
        self.run_dir = run_dir

    # ---- generation ----
    def generate(self, prompt: str | Sequence[str] = DEFAULT_PROMPT, n: int = 1, *,
                 processors: Sequence[LogitsProcessor] = (), policy: Policy | None = None,
                 **settings: Any) -> list[str]:
        """Continuations of each prompt (n per prompt, in order), without the prompt itself.

        `settings` are SampleConfig fields: max_new_tokens, temperature, top_k, top_p, min_p,
        typical_p, repetition_penalty, no_repeat_ngram_size, num_beams, stop, seed, ...
        `processors` run after the configured chain (a watermark, for example). A `policy`
        checks each prompt (a blocked prompt is an error; redactions apply before the model
        sees it) and each output (blocked text ends the sample, redactions are applied, and
        what matched is logged to the "trustgen" logger, without the matched text).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        config = sample_config(settings)
        rows = [p for p in self._checked_prompts(prompts, policy) for _ in range(n)]
        if config.num_beams > 1:
            return [self._beam(p, config, processors, policy) for p in rows]
        texts = ["" for _ in rows]
        for pieces in self._stream_rows(rows, config, processors, policy):
            for i, piece in enumerate(pieces):
                texts[i] += piece
        return texts

    def stream(self, prompt: str = DEFAULT_PROMPT, *, processors: Sequence[LogitsProcessor] = (),
               policy: Policy | None = None, **settings: Any) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as it is generated; with a policy,
        text is held back until no later token can turn it into a blocked or redacted match."""
        config = sample_config(settings)
        if config.num_beams > 1:
            raise TrustgenError("streaming works with sampling or greedy decoding, not with beam search.")
        for pieces in self._stream_rows(self._checked_prompts([prompt], policy), config, processors, policy):
            if pieces[0]:
                yield pieces[0]

    @staticmethod
    def _checked_prompts(prompts: list[str], policy: Policy | None) -> list[str]:
        if policy is None:
            return prompts
        checked = []
        for prompt in prompts:
            result = policy.check_prompt(prompt)
            _log_findings("the prompt", result.findings)
            checked.append(result.text)
        return checked

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise TrustgenError("the prompt is empty; give at least one character.")
        return self.tokenizer.encode(prompt)

    def _chain(self, config: SampleConfig, extra: Sequence[LogitsProcessor]) -> list[LogitsProcessor]:
        return [*build_chain(config), *extra]

    def _stream_rows(self, prompts: list[str], config: SampleConfig, extra: Sequence[LogitsProcessor],
                     policy: Policy | None = None) -> Iterator[list[str]]:
        """Per step, the new text of every row; rows stop at their first stop string or at
        text their policy blocks."""
        ids = [self.encode_prompt(p) for p in prompts]
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**63)
        generator = torch.Generator(self.device).manual_seed(seed)
        decoders = [self.tokenizer.stream_decoder() for _ in prompts]
        stops = [StopScanner(config.stop) for _ in prompts]
        filters = [policy.stream_filter() if policy is not None else _PassThrough() for _ in prompts]

        def finished(row: int) -> bool:
            return stops[row].finished or filters[row].blocked

        tokens_iter = sample_tokens(self.model, ids, config, self._chain(config, extra),
                                    self.tokenizer.vocab_size, generator)
        for tokens in tokens_iter:
            pieces = []
            for row, token in enumerate(tokens.tolist()):
                if finished(row):
                    pieces.append("")
                    continue
                pieces.append(filters[row].feed(stops[row].feed(decoders[row].push(token))))
            yield pieces
            if all(finished(row) for row in range(len(prompts))):
                break
        # What the decoders, stop scanners and filters still hold back is released at the end.
        yield [f.feed(s.feed(d.flush()) + s.close()) + f.close() for f, s, d in zip(filters, stops, decoders, strict=True)]
        if policy is not None:
            for row, f in enumerate(filters):
                _log_findings(f"sample {row + 1}", f.findings)

    def _beam(self, prompt: str, config: SampleConfig, extra: Sequence[LogitsProcessor],
              policy: Policy | None = None) -> str:
        ids = self.encode_prompt(prompt)

        def is_finished(tokens: list[int]) -> bool:
            return any(s in self.tokenizer.decode(tokens) for s in config.stop)

        tokens = beam_search(self.model, ids, config, self._chain(config, extra), self.tokenizer.vocab_size,
                             is_finished if config.stop else None)
        scanner = StopScanner(config.stop)
        text = scanner.feed(self.tokenizer.decode(tokens)) + scanner.close()
        if policy is None:
            return text
        result = policy.check(text)
        _log_findings("the beam search output", result.findings)
        return result.text

    # ---- description ----
    def info(self) -> dict[str, Any]:
        """Config, parameter count, data and losses of the run."""
        summary = run_summary(self.run_dir, self.run_config, self.model)
        summary["parameters"] = self.n_parameters  # before any int8 packing
        summary.update(tokenizer={"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
                       inference_precision=self.precision)
        return summary


class _PassThrough:
    """The stream filter when there is no policy: releases everything at once."""

    blocked = False

    def feed(self, piece: str) -> str:
        return piece

    def close(self) -> str:
        return ""


def _log_findings(where: str, findings: Sequence[Finding]) -> None:
    for finding in findings:
        verb = {"block": "stopped", "redact": "redacted", "warn": "flagged"}[finding.action]
        log.warning(f"policy rule '{finding.rule}' {verb} {finding.kind} text in {where} "
                    f"(characters {finding.start}-{finding.end})")


def sample_config(settings: dict[str, Any]) -> SampleConfig:
    """A validated SampleConfig from keyword settings; a single stop string may be a str."""
    if isinstance(settings.get("stop"), str):
        settings = {**settings, "stop": (settings["stop"],)}
    return SampleConfig.from_dict(settings)


class StopScanner:
    """Passes text through until a stop string appears, holding back any tail that could be the
    start of one, so no stop string (or a piece of it) is ever emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.finished = False

    def feed(self, text: str) -> str:
        if self.finished:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.finished = self.pending[: min(hits)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def close(self) -> str:
        out, self.pending, self.finished = self.pending, "", True
        return out


class ImageModel:
    """A trained image model (GAN or VAE): generate, interpolate, reconstruct, evaluate, describe."""

    def __init__(self, model: torch.nn.Module, run_config: dict[str, Any], device: torch.device,
                 run_dir: Path | None = None) -> None:
        self.model = model.to(device).eval()
        self.run_config = run_config
        self.device = device
        self.run_dir = run_dir
        self.classes: tuple[str, ...] = tuple(run_config.get("classes", ())) if model.config.n_classes else ()

    def labels(self, n: int, prompt: str | None = None) -> torch.Tensor | None:
        """The class of each of n images: the prompt's, or for a conditional model without a
        prompt, every class in turn; None for an unconditional model."""
        if prompt is not None:
            return torch.full((n,), label_for_prompt(prompt, self.classes), dtype=torch.long)
        if not self.classes:
            return None
        return torch.arange(n) % len(self.classes)

    def generate(self, n: int = 16, *, prompt: str | None = None, seed: int | None = None) -> np.ndarray:
        """n images as uint8 (n, C, H, W); a prompt names the class of a conditional model."""
        if n < 1:
            raise TrustgenError(f"n must be at least 1, got {n}.")
        return sample_images(self.model, n, self.labels(n, prompt), seed)

    def interpolate(self, steps: int, rows: int = 1, *, prompt: str | None = None,
                    seed: int | None = None) -> np.ndarray:
        """`rows` latent walks of `steps` images each: uint8 (rows * steps, C, H, W)."""
        return interpolate(self.model, steps, rows, self.labels(rows, prompt), seed)

    def reconstruct(self, images: np.ndarray, prompt: str | None = None) -> np.ndarray:
        """A VAE's reconstructions of uint8 images (N, C, H, W)."""
        if not hasattr(self.model, "reconstruct"):
            raise TrustgenError(f"a {self.run_config['family']} has no encoder, so it cannot reconstruct images.")
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).to(self.device)
        labels = self.labels(len(x), prompt)
        with torch.no_grad():
            return to_uint8(self.model.reconstruct(x, None if labels is None else labels.to(self.device)))

    def evaluate(self, n: int = 5000, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        """Quality and diversity of n samples against the training data, beside the floor of
        held-out real images (see trustgen.evaluate.images); for a conditional model, also how
        often the domain classifier agrees with the requested class."""
        from trustgen.evaluate.images import (
            evaluate_samples,
            load_domain_classifier,
            predict_classes,
        )

        if self.run_dir is None or "train" not in self.run_config:
            raise TrustgenError("evaluation compares samples with the training data, which this model does not name.")
        train = TrainConfig.from_dict(self.run_config["train"])
        split = split_images(load_images(train.data, train.image_size))
        labels = self.labels(n)
        samples = sample_images(self.model, n, labels, seed)
        report = evaluate_samples(samples, split, progress=progress)
        if labels is not None:
            classifier, _ = load_domain_classifier(split, progress=progress)
            agreed = predict_classes(classifier, samples) == labels.numpy()
            report["conditional_accuracy"] = float(agreed.mean())
        report["samples"] = n
        report["seed"] = seed
        io.write_json(self.run_dir / "evaluation.json", report)
        return report

    def info(self) -> dict[str, Any]:
        summary = run_summary(self.run_dir, self.run_config, self.model)
        if self.run_dir is not None:
            summary["pictures"] = [name for name in PICTURES if (self.run_dir / name).exists()]
            evaluation = self.run_dir / "evaluation.json"
            if evaluation.exists():
                summary["evaluation"] = io.read_json(evaluation)
        return summary
