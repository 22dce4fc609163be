"""The Python API: `train`, `resume`, `load`; a loaded `TextModel` generates and streams text.

Everything the CLI does goes through these functions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from trustgen import io
from trustgen.compress.quantize import quantize_int8
from trustgen.config import SampleConfig, TrainConfig, parse_duration
from trustgen.data.tokenizers import Tokenizer
from trustgen.errors import TrustgenError
from trustgen.models.registry import family as lookup_family
from trustgen.sample.decode import beam_search, sample_tokens
from trustgen.sample.processors import LogitsProcessor, build_chain
from trustgen.training import loop

DEFAULT_PROMPT = "\n"
PRECISIONS = ("auto", "fp32", "bf16", "int8")
DEFAULT_TIME_BUDGET = "5m"  # when neither a step count nor a time budget is given


def train_config(settings: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from keyword settings; durations may be written like "5m"."""
    settings = dict(settings)
    if settings.get("max_steps") is None and settings.get("time_budget") is None:
        settings["time_budget"] = DEFAULT_TIME_BUDGET
    budget = settings.get("time_budget")
    if isinstance(budget, str):
        settings["time_budget"] = parse_duration(budget)
    return TrainConfig.from_dict(settings)


def train(out: str | Path, *, model: str = "gpt", model_config: dict[str, Any] | None = None,
          progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Train a model into the run directory `out`.

    `settings` are TrainConfig fields (data, tokenizer, max_steps, time_budget="5m", ...); with
    neither max_steps nor time_budget, training runs for DEFAULT_TIME_BUDGET.
    `model_config` holds the family's own fields (n_layer, n_embd, cell, ...).
    Returns the summary: steps, elapsed seconds, final and best validation loss.
    """
    lookup_family(model)
    return loop.train(out, train_config(settings), model, model_config, progress=progress)


def resume(run_dir: str | Path, *, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Continue a run from its last checkpoint (overrides may extend max_steps or time_budget)."""
    if isinstance(overrides.get("time_budget"), str):
        overrides["time_budget"] = parse_duration(overrides["time_budget"])
    return loop.resume(run_dir, progress=progress, **overrides)


def load(run_dir: str | Path, device: str = "auto", precision: str = "auto") -> TextModel:
    """Load a trained text model from its run directory.

    precision: "fp32", "bf16", "auto" = bf16 where the hardware multiplies bf16 natively, or
    "int8" = weight-only int8 (fastest on CPUs, slightly lossy).
    """
    model, tokenizer, config = io.load_run_model(Path(run_dir))
    return TextModel(model, tokenizer, config, loop.resolve_device(device), Path(run_dir), precision)


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
            precision = "bf16" if loop.bf16_is_fast(device) else "fp32"
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
                 processors: Sequence[LogitsProcessor] = (), **settings: Any) -> list[str]:
        """Continuations of each prompt (n per prompt, in order), without the prompt itself.

        `settings` are SampleConfig fields: max_new_tokens, temperature, top_k, top_p, min_p,
        typical_p, repetition_penalty, no_repeat_ngram_size, num_beams, stop, seed, ...
        `processors` run after the configured chain (a watermark, for example).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        config = sample_config(settings)
        rows = [p for p in prompts for _ in range(n)]
        if config.num_beams > 1:
            return [self._beam(p, config, processors) for p in rows]
        texts = ["" for _ in rows]
        for pieces in self._stream_rows(rows, config, processors):
            for i, piece in enumerate(pieces):
                texts[i] += piece
        return texts

    def stream(self, prompt: str = DEFAULT_PROMPT, *, processors: Sequence[LogitsProcessor] = (),
               **settings: Any) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as it is generated."""
        config = sample_config(settings)
        if config.num_beams > 1:
            raise TrustgenError("streaming works with sampling or greedy decoding, not with beam search.")
        for pieces in self._stream_rows([prompt], config, processors):
            if pieces[0]:
                yield pieces[0]

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise TrustgenError("the prompt is empty; give at least one character.")
        return self.tokenizer.encode(prompt)

    def _chain(self, config: SampleConfig, extra: Sequence[LogitsProcessor]) -> list[LogitsProcessor]:
        return [*build_chain(config), *extra]

    def _stream_rows(self, prompts: list[str], config: SampleConfig,
                     extra: Sequence[LogitsProcessor]) -> Iterator[list[str]]:
        """Per step, the new text of every row; rows stop at their first stop string."""
        ids = [self.encode_prompt(p) for p in prompts]
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**63)
        generator = torch.Generator(self.device).manual_seed(seed)
        decoders = [self.tokenizer.stream_decoder() for _ in prompts]
        stops = [_StopScanner(config.stop) for _ in prompts]
        tokens_iter = sample_tokens(self.model, ids, config, self._chain(config, extra),
                                    self.tokenizer.vocab_size, generator)
        for tokens in tokens_iter:
            pieces = []
            for row, token in enumerate(tokens.tolist()):
                if stops[row].finished:
                    pieces.append("")
                    continue
                pieces.append(stops[row].feed(decoders[row].push(token)))
            yield pieces
            if all(s.finished for s in stops):
                return
        yield [s.feed(d.flush()) + s.close() for s, d in zip(stops, decoders, strict=True)]

    def _beam(self, prompt: str, config: SampleConfig, extra: Sequence[LogitsProcessor]) -> str:
        ids = self.encode_prompt(prompt)

        def is_finished(tokens: list[int]) -> bool:
            return any(s in self.tokenizer.decode(tokens) for s in config.stop)

        tokens = beam_search(self.model, ids, config, self._chain(config, extra), self.tokenizer.vocab_size,
                             is_finished if config.stop else None)
        scanner = _StopScanner(config.stop)
        return scanner.feed(self.tokenizer.decode(tokens)) + scanner.close()

    # ---- description ----
    def info(self) -> dict[str, Any]:
        """Config, parameter count, data and losses of the run."""
        summary: dict[str, Any] = {
            "family": self.run_config["family"],
            "model": self.run_config["model"],
            "parameters": self.n_parameters,
            "tokenizer": {"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
            "trustgen_version": self.run_config.get("trustgen_version"),
            "inference_precision": self.precision,
            "model_id": io.file_sha256(self.run_dir / "model.safetensors") if self.run_dir
            else io.weights_sha256(self.model),
        }
        if self.run_dir is not None:
            state_path = self.run_dir / "trainer_state.json"
            if state_path.exists():
                state = io.read_json(state_path)
                summary.update(step=state.get("step"), data=state.get("data"),
                               tokens_seen=state.get("tokens_seen"), training_seconds=state.get("elapsed_s"),
                               best_val_loss=state.get("best_val_loss"))
            final_path = self.run_dir / "summary.json"
            if final_path.exists():
                final = io.read_json(final_path)
                summary["final_val_loss"] = final.get("final_val_loss")
                best = [v for v in (summary.get("best_val_loss"), final.get("best_val_loss")) if v is not None]
                summary["best_val_loss"] = min(best) if best else None
            if "train" in self.run_config:
                summary["train"] = self.run_config["train"]
            if "source" in self.run_config:
                summary["source"] = self.run_config["source"]
        return summary


def sample_config(settings: dict[str, Any]) -> SampleConfig:
    """A validated SampleConfig from keyword settings; a single stop string may be a str."""
    if isinstance(settings.get("stop"), str):
        settings = {**settings, "stop": (settings["stop"],)}
    return SampleConfig.from_dict(settings)


class _StopScanner:
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
