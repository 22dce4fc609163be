"""The Python API: `train`, `resume`, `load`; a loaded `TextModel` generates and streams text,
a loaded `ImageModel` generates images, walks its latent space and measures its samples.

Generation is trust-aware: `generate(..., watermark="kgw", keystore=...)` watermarks with the
keystore's key, and what it returns carries the watermark's scheme and key id and can be saved
with a signed manifest and detected again (see trustgen.safety.trust, which does the work).
Nothing is watermarked unless asked, so plain use never creates keys.

Everything the CLI does goes through these functions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustgen import io, runs
from trustgen.compress.quantize import quantize_int8
from trustgen.config import SampleConfig, TrainConfig, parse_duration, sample_config
from trustgen.data.images import load_images, split_images
from trustgen.data.music import (
    VOICE_RANGES,
    Chorale,
    chorale_text,
    find_chorales,
    parse_text,
    split_chorales,
    transpositions,
    write_score,
)
from trustgen.data.tokenizers import MusicTokenizer, Tokenizer
from trustgen.errors import TrustgenError
from trustgen.evaluate.music import music_report, ngram_nll
from trustgen.evaluate.text import sequence_nll
from trustgen.models.registry import family_of
from trustgen.progress import counted
from trustgen.runtime import bf16_is_fast, resolve_device
from trustgen.safety.policy import Finding, Policy
from trustgen.safety.trust import Artifact, ImageTrust, Keys, Mark, TextDetection, TextTrust
from trustgen.sample.decode import beam_search, check_prompts, sample_tokens
from trustgen.sample.images import (
    PICTURES,
    interpolate,
    label_for_prompt,
    make_grid,
    png_bytes,
    sample_images,
    to_uint8,
)
from trustgen.sample.music import (
    SAMPLE_RATE,
    ScoreGrammar,
    harmonization_plan,
    piano_roll,
    synthesize,
)
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


def train(out: str | Path, *, model: str | None = None, model_config: dict[str, Any] | None = None,
          progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Train a model into the run directory `out`.

    `model`: gpt (the default) or rnn (text), gan or vae (images); with init_from, that run's.
    Settings the model would ignore are refused (`runs.training_family`). `settings` are TrainConfig fields (data,
    tokenizer, image_size, max_steps, time_budget="5m", ...) over the family's defaults; with
    neither max_steps nor time_budget, text trains for 5 minutes and images for 10.
    `model_config` holds the family's own fields (n_layer, n_embd, cell, latent_dim, beta, ...;
    conditional=True for a class-conditional image model).
    Returns the summary: steps, elapsed seconds, final and best validation loss (None for a GAN).
    """
    family = runs.training_family(model, settings)
    return runs.train_run(out, train_config(settings, family), family, model_config, progress=progress)


def resume(run_dir: str | Path, *, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Continue a run from its last checkpoint, or start again one stopped before its first.
    Overrides (max_steps, time_budget, device, checkpoint_interval) are saved with its next
    checkpoint; a finished run is refused unless they extend it (see runs.resume_run)."""
    if isinstance(overrides.get("time_budget"), str):
        overrides["time_budget"] = parse_duration(overrides["time_budget"])
    return runs.resume_run(run_dir, progress=progress, **overrides)


def federate(out: str | Path, *, model: str = "gpt", model_config: dict[str, Any] | None = None,
             clients: int = 8, rounds: int = 40, partition: str | None = None, strategy: str = "fedavg",
             local_steps: int = 50, min_clients: int | None = None, proximal_mu: float = 0.01,
             server_lr: float = 0.01, round_timeout: float = 3600, tls: bool = True, resume: bool = False,
             client_dp_epsilon: float | None = None, client_dp_clip: float = 1.0, update_precision: str = "fp32",
             secure_aggregation: bool = False, q: float = 0.1, progress: bool = True,
             **settings: Any) -> dict[str, Any]:
    """Train one model across `clients` data owners with Flower: a SuperLink and one
    SuperNode per client on this machine (TLS by default), `rounds` rounds of `local_steps`
    local steps each, aggregated by `strategy` (fedavg, fedprox with `proximal_mu`, fedadam
    with `server_lr`, qfedavg with `q`); a round goes ahead with `min_clients` (default: all).
    `model`: gpt or rnn (text), vae or gan (images; a GAN's discriminators stay with the
    clients). `partition` splits the data (`settings["data"]`): a corpus iid, by-play,
    by-speaker (the default) or dirichlet:A; images iid (the default) or dirichlet:A over
    their classes.
    `client_dp_epsilon` (with `client_dp_clip`) makes each client's update (epsilon, 1e-5)-DP per
    round; `update_precision` (fp32, bf16, int8) is how clients send their updates;
    `secure_aggregation` runs training under SecAgg+ (the server sees only the sum of updates).
    `resume=True` continues `out` from its last committed round (`rounds` may raise the total).
    Returns the summary: rounds, final global and per-client held-out loss, bytes moved."""
    from trustgen.federated.run import federate as run_federation
    from trustgen.federated.settings import federated_settings

    if resume:
        return run_federation(out, resume=True, rounds=rounds, progress=progress)
    # Each round restarts the local schedule, so warmup would eat the local steps.
    config = train_config({"warmup_steps": 0, "max_steps": local_steps, **settings}, model)
    if partition is None:
        partition = "by-speaker" if family_of(model).modality == "text" else "iid"
    fed = federated_settings(clients=clients, rounds=rounds, partition_scheme=partition, strategy=strategy,
                             local_steps=local_steps, min_clients=min_clients, proximal_mu=proximal_mu,
                             server_lr=server_lr, round_timeout=round_timeout, tls=tls,
                             client_dp_epsilon=client_dp_epsilon, client_dp_clip=client_dp_clip,
                             update_precision=update_precision, secure_aggregation=secure_aggregation, q=q)
    return run_federation(out, config, model, model_config, fed, progress=progress)


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


def model_id(run_dir: Path | None, model: torch.nn.Module) -> str:
    """A model's id: the SHA-256 of its run's weights file, or of its weights as a safetensors
    file for a model without a run directory."""
    if run_dir is not None:
        return io.file_sha256(run_dir / "model.safetensors")
    return io.weights_sha256(model)


def run_summary(run_dir: Path | None, run_config: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """What every run shows: family, settings, size, training state, losses and model id."""
    summary: dict[str, Any] = {
        "family": run_config["family"],
        "model": run_config["model"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trustgen_version": run_config.get("trustgen_version"),
        "model_id": model_id(run_dir, model),
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
    if privacy_claim(run_config):
        summary["privacy"] = privacy_claim(run_config)
    return summary


# Text samples decode together, each with its key/value cache (2 MB for the default GPT).
MAX_TEXT_ROWS = 10_000
# Generated images are held in memory as uint8 pixels until written.
MAX_IMAGE_BYTES = 1 << 30


def privacy_claim(run_config: dict[str, Any]) -> str | None:
    """What a private run's manifests claim: "trained with (eps, delta)-DP, unit: ..."; None otherwise."""
    if "privacy" not in run_config:
        return None
    from trustgen.training.privacy import describe

    return describe(run_config["privacy"])


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
    @cached_property
    def model_id(self) -> str:
        """What a manifest names the model by (see `model_id`)."""
        return model_id(self.run_dir, self.model)

    def trust(self, watermark: str | None = None, keystore: str | Path | Keys | None = None, *,
              settings: dict[str, Any] | None = None, seed: int | None = None) -> TextTrust:
        """How text from this model is watermarked and signed (trustgen.safety.trust.TextTrust):
        `watermark` kgw, synthid or None; `settings` and `seed` go into the claim."""
        tokenizer_file = self.run_dir / "tokenizer.json" if self.run_dir is not None else None
        return TextTrust(Keys.of(keystore), model_id=lambda: self.model_id, family=self.run_config["family"],
                         vocab_size=self.tokenizer.vocab_size, tokenizer_file=tokenizer_file,
                         tokenizer_json=None if tokenizer_file is not None else self.tokenizer.to_json,
                         watermark=watermark, settings=settings, seed=seed, privacy=privacy_claim(self.run_config))

    def generate(self, prompt: str | Sequence[str] = DEFAULT_PROMPT, n: int = 1, *,
                 processors: Sequence[LogitsProcessor] = (), policy: Policy | None = None,
                 watermark: str | None = None, keystore: str | Path | Keys | None = None,
                 progress: bool = False, **settings: Any) -> list[GeneratedText]:
        """Continuations of each prompt (n per prompt, in order), without the prompt itself.

        `settings` are SampleConfig fields: max_new_tokens, temperature, top_k, top_p, min_p,
        typical_p, repetition_penalty, no_repeat_ngram_size, num_beams, stop, seed, ...
        `processors` run after the configured chain (a watermark, for example). A `policy`
        checks each prompt (a blocked prompt is an error; redactions apply before the model
        sees it) and each output (blocked text ends the sample, redactions are applied, and
        what matched is logged to the "trustgen" logger, without the matched text).

        `watermark` ("kgw", "synthid"; default None: no watermark) marks the
        text with the watermark key of `keystore` (default ~/.trustgen/keys or
        $TRUSTGEN_KEYSTORE; keys are made there on first use). Each output is a GeneratedText:
        a `str`, so callers that use the result as a list of strings are unaffected, that also
        carries its prompt, its watermark's scheme and key id (`.watermark`, never the key),
        `.detect()` and `.save(path)`, which writes prompt + text and signs it. `progress`
        shows a bar of the tokens generated on the terminal.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        config = sample_config(settings)
        rows = [p for p in self._checked_prompts(prompts, policy) for _ in range(n)]
        if len(rows) > MAX_TEXT_ROWS:
            raise TrustgenError(f"{len(rows):,} samples would decode together in one batch, which holds a "
                                f"cache per sample in memory; ask for at most {MAX_TEXT_ROWS:,} at a time.")
        self._check_prompts(rows)  # before the watermark makes keys for a request that fails
        trust = self.trust(watermark, keystore, settings={k: v for k, v in settings.items() if k != "seed"},
                           seed=config.seed)
        processors = [*processors, *trust.processors]
        if config.num_beams > 1:
            texts = [self._beam(p, config, processors, policy) for p in rows]
        else:
            # Pieces joined once at the end: `+=` on a str held in a list copies the whole text
            # every step, quadratic in its length.
            parts: list[list[str]] = [[] for _ in rows]
            steps = self._stream_rows(rows, config, processors, policy)
            for pieces in counted(steps, config.max_new_tokens + 1, "generating", progress, unit="tok"):
                for row_parts, piece in zip(parts, pieces, strict=True):
                    row_parts.append(piece)
            texts = ["".join(row_parts) for row_parts in parts]
        return [GeneratedText(text, row, trust) for text, row in zip(texts, rows, strict=True)]

    def stream(self, prompt: str = DEFAULT_PROMPT, *, processors: Sequence[LogitsProcessor] = (),
               policy: Policy | None = None, watermark: str | None = None,
               keystore: str | Path | Keys | None = None, **settings: Any) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as it is generated; with a policy,
        text is held back until no later token can turn it into a blocked or redacted match.
        `watermark` and `keystore` as in `generate`."""
        config = sample_config(settings)
        if config.num_beams > 1:
            raise TrustgenError("streaming works with sampling or greedy decoding, not with beam search.")
        prompts = self._checked_prompts([prompt], policy)
        self._check_prompts(prompts)
        processors = [*processors, *self.trust(watermark, keystore).processors]
        for pieces in self._stream_rows(prompts, config, processors, policy):
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

    def _check_prompts(self, prompts: list[str]) -> None:
        """A clear error for an empty prompt or one longer than the model's context."""
        check_prompts(self.model, [self.encode_prompt(p) for p in dict.fromkeys(prompts)])

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


class GeneratedText(str):
    """One generated text: the continuation, without its prompt, as a `str` (so code that treats
    `TextModel.generate`'s result as a list of strings keeps working unchanged: equality,
    concatenation, JSON), carrying what its manifest would say and handles to check and keep it.
    Copying or pickling gives a plain str."""

    prompt: str
    trust: TextTrust

    def __new__(cls, text: str, prompt: str, trust: TextTrust) -> GeneratedText:
        made = super().__new__(cls, text)
        made.prompt, made.trust = prompt, trust
        return made

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return str, (str(self),)

    @property
    def watermark(self) -> Mark | None:
        """The watermark's scheme and key id, None when unwatermarked."""
        return self.trust.mark

    def detect(self) -> TextDetection:
        """Test this text for the keystore's watermark (with its tokenizer and scheme)."""
        return self.trust.detect(str(self))

    def save(self, path: str | Path, *, sign: bool = True) -> Artifact:
        """Write prompt + text to `path` and, with `sign`, its signed FILE.manifest.json;
        the returned Artifact verifies them."""
        return self.trust.save(path, self.prompt + self, sign=sign)


# ---- music ----

MUSIC_PROMPT = "\n\n"  # the boundary between pieces: a music model starts a piece after it
STEPS_PER_BAR = 16


def is_music_run(run_dir: str | Path) -> bool:
    """Whether the run's model writes music tokens (trained on --data bach or a folder of scores)."""
    return runs.read_run_config(Path(run_dir)).get("tokenizer") == MusicTokenizer.kind


class Composition:
    """One generated four-voice piece: its score (`chorale`) and its music tokens as text, which
    carry the watermark and the trust of the generation (`text.trust`)."""

    def __init__(self, chorale: Chorale, text: GeneratedText) -> None:
        self.chorale = chorale
        self.text = text

    @property
    def watermark(self) -> Mark | None:
        return self.text.watermark

    def save(self, stem: str | Path, *, sign: bool = True, audio: bool = True) -> list[Artifact]:
        """Write STEM.mid, STEM.musicxml, STEM.wav (44.1 kHz; left out without `audio`) and
        STEM.png (piano roll); with `sign`, the MIDI file gets a signed sidecar manifest
        (STEM.mid.manifest.json) and the WAV a C2PA manifest inside it. A watermarked piece's WAV
        also carries the audio watermark (trustgen.safety.watermark.audio); its notes carry the
        symbolic one."""
        stem = Path(stem)
        trust = self.text.trust
        midi = trust.written(write_score(self.chorale, stem.with_suffix(".mid")), sign=sign)
        score = trust.written(write_score(self.chorale, stem.with_suffix(".musicxml")), sign=False)
        wav = [trust.save_audio(synthesize(self.chorale), stem.with_suffix(".wav"), sample_rate=SAMPLE_RATE,
                                sign=sign)] if audio else []
        png = stem.with_suffix(".png")
        io.atomic_write_bytes(png, png_bytes(piano_roll(self.chorale)))
        return [midi, score, *wav, trust.written(png, sign=False)]


def compose(model: TextModel, n: int = 1, *, melody: Chorale | None = None, bars: int = 16, min_bars: int = 0,
            in_range: bool = True, watermark: str | None = None, keystore: str | Path | Keys | None = None,
            **settings: Any) -> list[Composition]:
    """`n` new pieces from a music model, or `n` harmonizations of `melody`'s soprano line: the
    soprano (and the bar lines) are forced, the other voices sampled (see
    trustgen.sample.music.ScoreGrammar); with `in_range`, no sampled note leaves its voice's
    range (VOICE_RANGES). Free pieces end where the model ends them, at the latest after `bars`
    bars and not before `min_bars` bars of 4/4. `watermark` and `settings` as in
    TextModel.generate."""
    if model.tokenizer.kind != MusicTokenizer.kind:
        raise TrustgenError("this run writes text, not music; train one with --data bach (or a folder of scores).")
    if not 0 <= min_bars <= bars:
        raise TrustgenError(f"min_bars must be between 0 and bars ({bars}), not {min_bars}.")
    plan = harmonization_plan(melody) if melody is not None else None
    settings.setdefault("max_new_tokens", len(plan) + 1 if plan else bars * (4 * STEPS_PER_BAR + 1) + 1)
    grammar = ScoreGrammar(plan, ranges=VOICE_RANGES if in_range else None, min_steps=min_bars * STEPS_PER_BAR)
    texts = model.generate(MUSIC_PROMPT, n, processors=[grammar], watermark=watermark,
                           keystore=keystore, stop=(MUSIC_PROMPT,), **settings)
    return [Composition(parse_text(text, f"piece-{i + 1}"), text) for i, text in enumerate(texts)]


def evaluate_music(run_dir: str | Path, n: int = 20, bars: int = 16, seed: int = 0,
                   device: str = "auto") -> dict[str, Any]:
    """A music run's held-out NLL per token (beside unigram and bigram models of its training
    tokens) and the musical statistics of `n` free pieces against the held-out chorales, with
    Bach's own numbers as the floor (see trustgen.evaluate.music); written to
    RUN/music_evaluation.json."""
    run_dir = Path(run_dir)
    model = load(run_dir, device=device)
    config = TrainConfig.from_dict(model.run_config.get("train", {}))
    train, held_out = split_chorales(config.data, find_chorales(config.data), config.val_fraction, config.seed)

    def tokens(pieces: Sequence[Chorale]) -> list[list[int]]:
        end = MusicTokenizer.END
        return [[end, *model.tokenizer.encode(chorale_text(c)), end] for c in pieces]

    nll, scored = sequence_nll(model.model, tokens(held_out))
    training_tokens = tokens([*train, *transpositions(train)])
    pieces = [c.chorale for c in compose(model, n, bars=bars, seed=seed)]
    report = music_report(pieces, held_out, train)
    report["generated"]["heldout_nll"] = float(nll.sum() / scored.sum())
    report["baselines"] = {f"{name}_heldout_nll": ngram_nll(training_tokens, tokens(held_out), order, MusicTokenizer().vocab_size)
                           for order, name in ((1, "unigram"), (2, "bigram"))}
    io.write_json(run_dir / "music_evaluation.json", report)
    return report


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

    @cached_property
    def model_id(self) -> str:
        """What a manifest names the model by (see `model_id`)."""
        return model_id(self.run_dir, self.model)

    def trust(self, watermark: str | None = None, keystore: str | Path | Keys | None = None, *,
              settings: dict[str, Any] | None = None, seed: int | None = None) -> ImageTrust:
        """How pictures from this model are watermarked and signed (trustgen.safety.trust.ImageTrust):
        `watermark` spectral or None; `settings` and `seed` go into the claim."""
        return ImageTrust(Keys.of(keystore), model_id=lambda: self.model_id, family=self.run_config["family"],
                          watermark=watermark, settings=settings, seed=seed, privacy=privacy_claim(self.run_config))

    def generate(self, n: int = 16, *, prompt: str | Sequence[str] | None = None, seed: int | None = None,
                 watermark: str | None = None, keystore: str | Path | Keys | None = None) -> GeneratedImages:
        """n images as uint8 (n, C, H, W); a prompt names the class of a conditional model (a list
        of prompts: n images for each, in turn, with the same seed).

        The result is a GeneratedImages, an ndarray of the pixels as sampled that also knows how
        to write them: `save` (a PNG per image), `save_grid` (one picture) or `pngs` (bytes),
        each watermarked with `watermark` ("spectral"; default None: no watermark) and the key of
        `keystore`, then signed with a C2PA manifest that covers the watermarked pixels."""
        if n < 1:
            raise TrustgenError(f"n must be at least 1, got {n}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        self._check_count(n * max(len(prompts), 1))
        images = np.concatenate([sample_images(self.model, n, self.labels(n, p), seed) for p in prompts or [None]])
        trust = self.trust(watermark, keystore, settings={"n": n, "prompts": prompts, "interpolate": None}, seed=seed)
        return GeneratedImages(images, trust, columns=n if len(prompts) > 1 else None)

    def _check_count(self, images: int) -> None:
        """Refuse more images than MAX_IMAGE_BYTES of pixels: they are all held in memory."""
        size = self.model.config.channels * self.model.config.image_size ** 2
        if images * size > MAX_IMAGE_BYTES:
            raise TrustgenError(
                f"{images:,} images would hold {images * size / 1e9:,.1f} GB of pixels in memory; this model "
                f"generates at most {MAX_IMAGE_BYTES // size:,} at a time ({MAX_IMAGE_BYTES >> 20} MiB): "
                "ask for fewer, in several runs.")

    def interpolate(self, steps: int, rows: int = 1, *, prompt: str | Sequence[str] | None = None,
                    seed: int | None = None, watermark: str | None = None,
                    keystore: str | Path | Keys | None = None) -> GeneratedImages:
        """`rows` latent walks of `steps` images each: uint8 (rows * steps, C, H, W) (for each
        prompt of a list, in turn); `save_grid` writes them as one strip of `steps` columns.
        `watermark` and `keystore` as in `generate`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        self._check_count(steps * rows * max(len(prompts), 1))
        walks = np.concatenate([interpolate(self.model, steps, rows, self.labels(rows, p), seed)
                                for p in prompts or [None]])
        trust = self.trust(watermark, keystore, settings={"n": rows, "prompts": prompts, "interpolate": steps},
                           seed=seed)
        return GeneratedImages(walks, trust, columns=steps)

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
        train = TrainConfig.from_run(self.run_config["train"])
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


def picture_path(path: str | Path) -> Path:
    """A path for a picture: pictures are written as PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TrustgenError(f"pictures are written as PNG; name the file {path.with_suffix('.png').name}.")
    return path


class GeneratedImages(np.ndarray):
    """Generated images, uint8 (N, C, H, W), as sampled: an ndarray (so code that uses
    `ImageModel.generate`'s result as an array keeps working unchanged) that also knows how to
    write them with their watermark and signed manifest.

    The watermark goes into the pixels of each picture as it is written, not into this array: a
    grid carries one watermark over its whole extent, which small tiles could not carry each on
    their own. `watermarked()` gives the pixels of each image with its own watermark."""

    trust: ImageTrust | None
    columns: int | None

    def __new__(cls, images: np.ndarray, trust: ImageTrust, columns: int | None = None) -> GeneratedImages:
        made = np.asarray(images).view(cls)
        made.trust, made.columns = trust, columns
        return made

    def __array_finalize__(self, obj: Any) -> None:
        self.trust = getattr(obj, "trust", None)
        self.columns = getattr(obj, "columns", None)

    def _trust(self) -> ImageTrust:
        if self.trust is None:
            raise TrustgenError("these pixels do not come from ImageModel.generate, so they cannot be signed.")
        return self.trust

    @property
    def watermark(self) -> Mark | None:
        """The watermark asked for (scheme and key id), None for none. A written picture carries
        it only when it can: see each Artifact's `watermark` and `note`."""
        return None if self.trust is None else self.trust.mark

    def watermarked(self) -> np.ndarray:
        """Each image's pixels with its own watermark, uint8 (N, C, H, W)."""
        trust = self._trust()
        return np.stack([trust.watermarked(image.transpose(1, 2, 0)).transpose(2, 0, 1)
                         for image in np.asarray(self)])

    def grid(self) -> np.ndarray:
        """The images as one picture (H, W, C): rows of `columns` (one per prompt, or a walk)."""
        return make_grid(np.asarray(self), columns=self.columns)

    def save_grid(self, path: str | Path, *, sign: bool = True) -> Artifact:
        """Write the grid as one PNG: watermarked, then (with `sign`) with a C2PA manifest."""
        return self._trust().save(self.grid(), picture_path(path), sign=sign)

    def save(self, out: str | Path, *, sign: bool = True, progress: bool = False) -> list[Artifact]:
        """Write one PNG per image, watermarked, then (with `sign`) each with its C2PA manifest:
        into the folder `out` as 0001.png, 0002.png, ..., or, when `out` names a .png file, as
        it, then NAME-2.png, NAME-3.png, ...; `progress` shows a bar of the files written."""
        out = Path(out)
        if out.suffix:
            names = [picture_path(out)] + [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(1, len(self))]
        else:
            out.mkdir(parents=True, exist_ok=True)
            names = [out / f"{i + 1:04d}.png" for i in range(len(self))]
        trust = self._trust()
        pairs = counted(zip(names, np.asarray(self), strict=True), len(names), "writing images", progress,
                        unit="img")
        return [trust.save(image.transpose(1, 2, 0), name, sign=sign) for name, image in pairs]

    def pngs(self, *, sign: bool = True) -> list[bytes]:
        """Each image as PNG file bytes, watermarked, then (with `sign`) with its C2PA manifest."""
        return [png for png, _ in self.encoded(sign=sign)]

    def encoded(self, *, sign: bool = True) -> list[tuple[bytes, Artifact]]:
        """`pngs`, each with what was written: its watermark, or the note saying why it has none."""
        trust = self._trust()
        return [trust.encoded(image.transpose(1, 2, 0), f"{i}.png", sign=sign)
                for i, image in enumerate(np.asarray(self))]
