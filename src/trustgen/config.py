"""Frozen, keyword-only configuration dataclasses, validated on construction.

Every config can go to and from plain JSON-able dicts. Unknown keys are errors, never ignored,
and a bad value fails at once with a sentence that names the field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from trustgen.errors import TrustgenError

C = TypeVar("C", bound="Config")


class ConfigError(TrustgenError):
    """A configuration value is invalid."""


def check(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base class: JSON round trip with strict keys and basic type checks."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; "
                              f"valid fields are {', '.join(sorted(known))}.")
        hints = typing.get_type_hints(cls)
        converted = {k: _coerce(cls.__name__, k, v, hints[k]) for k, v in values.items()}
        return cls(**converted)

    def replace(self: C, **changes: Any) -> C:
        return self.from_dict({**self.to_dict(), **changes})


def _coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Check `value` against a simple type hint; JSON lists become tuples."""
    allowed = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        check(type(None) in allowed, f"{owner}.{name} must not be empty.")
        return None
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is typing.Literal:
            if value in typing.get_args(kind):
                return value
            continue
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(origin, type) and isinstance(value, origin):
            return value
    expected = " or ".join(_describe(k) for k in allowed)
    raise ConfigError(f"{owner}.{name} must be {expected}, got {value!r}.")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    return getattr(kind, "__name__", str(kind))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90s', '5m', '1.5h' or a bare number of seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"cannot read {text!r} as a duration; write it like 90s, 5m or 1h.")
    number, unit = float(match.group(1)), (match.group(2) or "s")[0]
    return number * {"s": 1, "m": 60, "h": 3600}[unit]


TokenizerKind = typing.Literal["char", "byte", "bpe"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """How to train: data, optimisation, schedule, budget and bookkeeping."""

    data: str = "shakespeare"
    tokenizer: TokenizerKind = "char"  # text only
    vocab_size: int = 4096  # only for bpe
    scrub_pii: bool = False  # text only: replace e-mails, phones, cards, IPs and IBANs before training
    counterfactual_augment: typing.Literal["gender"] | None = None  # text only: add word-swapped copies (fairness)
    canaries: int = 0  # text only: insert this many random secrets (1, 10, 100 copies) to audit memorization
    image_size: int | None = None  # images only: resize to this; None keeps a built-in set's size (folders: 64)
    val_fraction: float = 0.1  # user data only; the built-in corpus has a fixed split
    # text only: share of the training documents held out in pieces for membership inference
    # (trustgen.data.text.hold_out_pieces); runs from before it existed held out nothing (from_run)
    membership_holdout: float = 0.02
    seed: int = 1337

    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = None
    time_budget: float | None = None  # seconds of training; the lr schedule follows elapsed time
    learning_rate: float = 2e-3
    discriminator_lr: float | None = None  # GANs only; None: learning_rate (follows its schedule)
    min_learning_rate: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0

    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: float = 30.0  # seconds between checkpoints at most (one comes at every evaluation too)
    precision: typing.Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    device: str = "auto"

    init_from: str | None = None
    freeze_layers: int = 0

    # Differential privacy (DP-SGD through Opacus; trustgen.training.privacy). None: off.
    dp_epsilon: float | None = None
    dp_delta: float | None = None  # None: 1 / (private examples)^1.1
    max_grad_norm: float = 1.0  # per-example clipping bound
    dp_accountant: typing.Literal["prv", "rdp"] = "prv"
    dp_unit: typing.Literal["window", "document"] = "window"  # text: what one example is

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}.")
        check(self.grad_accum >= 1, f"grad_accum must be at least 1, got {self.grad_accum}.")
        check(self.max_steps is None or self.max_steps >= 1,
              f"max_steps must be at least 1, got {self.max_steps}.")
        check(self.time_budget is None or self.time_budget > 0,
              f"time_budget must be positive, got {self.time_budget}.")
        check(self.max_steps is not None or self.time_budget is not None,
              "give max_steps or time_budget, or both, so training knows when to stop.")
        check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}.")
        check(self.discriminator_lr is None or self.discriminator_lr > 0,
              f"discriminator_lr must be positive, got {self.discriminator_lr}.")
        check(self.image_size is None or 8 <= self.image_size <= 512,
              f"image_size must lie between 8 and 512 pixels, got {self.image_size}.")
        check(0 <= self.min_learning_rate <= self.learning_rate,
              "min_learning_rate must lie between 0 and learning_rate.")
        check(self.warmup_steps >= 0, "warmup_steps must not be negative.")
        check(self.weight_decay >= 0, "weight_decay must not be negative.")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must lie in [0, 1).")
        check(self.grad_clip >= 0, "grad_clip must not be negative (0 turns clipping off).")
        check(0 < self.val_fraction < 1, f"val_fraction must lie in (0, 1), got {self.val_fraction}.")
        check(0 <= self.membership_holdout < 0.5,
              f"membership_holdout must lie in [0, 0.5), got {self.membership_holdout}.")
        check(256 < self.vocab_size <= 1 << 20,
              f"vocab_size must lie in (256, 1048576] for bpe, got {self.vocab_size}.")
        check(self.eval_interval >= 1 and self.eval_batches >= 1 and self.log_interval >= 1,
              "eval_interval, eval_batches and log_interval must be at least 1.")
        check(self.checkpoint_interval > 0,
              f"checkpoint_interval must be a positive number of seconds, got {self.checkpoint_interval}.")
        check(self.freeze_layers >= 0, "freeze_layers must not be negative.")
        check(0 <= self.canaries <= 1000, f"canaries must lie between 0 and 1000, got {self.canaries}.")
        check(self.dp_epsilon is None or self.dp_epsilon > 0,
              f"dp_epsilon must be positive, got {self.dp_epsilon}.")
        check(self.dp_delta is None or 0 < self.dp_delta < 1, f"dp_delta must lie in (0, 1), got {self.dp_delta}.")
        check(self.max_grad_norm > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}.")

    @property
    def private(self) -> bool:
        return self.dp_epsilon is not None

    @classmethod
    def from_run(cls, values: dict[str, Any]) -> TrainConfig:
        """The settings a run directory recorded; a run from before `membership_holdout` existed
        trained on all of its training documents, so it holds nothing out when prepared again."""
        return cls.from_dict({"membership_holdout": 0.0, **values})


# A generation is held in memory (the text, and the token history processors read), and a
# million tokens take a CPU tens of minutes: longer texts are several generations.
MAX_NEW_TOKENS = 1_000_000


@dataclass(frozen=True, kw_only=True)
class SampleConfig(Config):
    """How to decode: the processor chain's settings plus search and stopping."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        check(self.max_new_tokens <= MAX_NEW_TOKENS,
              f"max_new_tokens must be at most {MAX_NEW_TOKENS:,} per sample (the text is held in memory); "
              f"got {self.max_new_tokens:,}: generate longer texts in several parts.")
        check(self.temperature >= 0, f"temperature must be 0 (greedy) or positive, got {self.temperature}.")
        check(self.top_k is None or self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}.")
        for name in ("top_p", "min_p", "typical_p"):
            value = getattr(self, name)
            check(value is None or 0 < value <= 1, f"{name} must lie in (0, 1], got {value}.")
        check(self.repetition_penalty is None or self.repetition_penalty > 0,
              f"repetition_penalty must be positive, got {self.repetition_penalty}.")
        check(self.no_repeat_ngram_size is None or self.no_repeat_ngram_size >= 1,
              f"no_repeat_ngram_size must be at least 1, got {self.no_repeat_ngram_size}.")
        check(self.num_beams >= 1, f"num_beams must be at least 1, got {self.num_beams}.")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_config(settings: dict[str, Any]) -> SampleConfig:
    """A validated SampleConfig from keyword settings; a single stop string may be a str."""
    if isinstance(settings.get("stop"), str):
        settings = {**settings, "stop": (settings["stop"],)}
    return SampleConfig.from_dict(settings)
