"""Differentially private training (DP-SGD, Abadi et al. 2016) through Opacus.

`private_wrap(config, ...)` returns the trainer's `wrap` hook: Opacus' `PrivacyEngine` adds
per-sample gradient hooks to the model (the discriminator only, for a GAN), wraps the optimizer
in its clipping-and-noising `DPOptimizer` and keeps the accountant; the training source becomes
a `PrivateSource` that draws each step's examples by Poisson sampling (every example joins a
batch independently with probability q, which is what the accountants assume).

The unit of privacy is one *example*, and an example must not share data with another:
- `window`: non-overlapping windows of block_size + 1 tokens of the training stream, so every
  token is in exactly one example (the random overlapping windows of ordinary training would
  put one secret into hundreds of examples). A secret crossing a window boundary is in two
  examples: group privacy with k = 2.
- `document`: every training document is split into its own windows (the last one padded, its
  padding ignored by the loss); one document is k examples, k the most windows of any document,
  and its guarantee is the group-privacy bound (k*eps, k*exp((k-1)*eps)*delta).

The noise multiplier is chosen so that the planned steps (max_steps, or the steps a probe
estimates fit in the time budget) spend exactly the target epsilon; training stops once they
are taken. With a time budget the plan is remade once from the steps' own pace (after a tenth
of the budget or half the planned steps): the steps that fit in the rest of the budget get the
noise that makes the whole run spend the target, the steps already taken keep theirs.

A GAN's generator never sees real data: it learns only from the private discriminator, so its
update is post-processing and costs no privacy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trustgen.config import TrainConfig
from trustgen.data.text import DOCUMENT_SEPARATOR
from trustgen.errors import TrustgenError
from trustgen.models.registry import family_of
from trustgen.training.checkpoint import decode_rng_state, encode_rng_state
from trustgen.training.optim import make_optimizer

NOISE_SEED_OFFSET = 0xD9  # the noise generator's seed is the run's seed plus this
PROBE_STEPS = 3
PROBE_OVERHEAD = 1.2  # optimizer, noise and evaluation on top of the probed forward/backward
REPLAN_AT = 0.1  # share of a time budget after which the plan is remade from the measured pace
REPLAN_MARGIN = 1.05  # the remade plan fills 95% of the time left: the pace moves with the load
MIN_PACED_STEPS = 3  # steps timed before the pace is trusted
EPSILON_TOLERANCE = 0.01  # the remade plan spends the target epsilon to within this (Opacus' default)
EMPTY_FLOOR = 1e-6  # refuse batches so small that an empty Poisson draw is likely


def default_delta(n_examples: int) -> float:
    """1 / N^1.1: below 1/N, which a mechanism that publishes one random example would meet."""
    return 1 / n_examples ** 1.1


def group_bound(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one example gives this for k examples (group privacy); a delta
    of 1 says the bound is vacuous."""
    return k * epsilon, min(1.0, k * math.exp((k - 1) * epsilon) * delta)


# -- examples: what one unit of privacy is -------------------------------------------------

class DisjointWindows:
    """Non-overlapping windows of block_size + 1 tokens: example i is tokens [i(T+1), (i+1)(T+1)),
    so no token is in two examples."""

    unit = "window"
    group = 1

    def __init__(self, windows: Any) -> None:
        self.windows = windows
        self.stride = self.window_tokens = windows.block_size + 1

    def __len__(self) -> int:
        return self.windows.n_tokens // self.stride

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(index * self.stride)


class DocumentWindows:
    """The windows of each document, never crossing into the next; the last window of a
    document is padded, its padded targets -100 (ignored by cross-entropy)."""

    unit = "document"

    def __init__(self, windows: Any, lengths: list[int], separator: int) -> None:
        self.windows = windows
        size = self.window_tokens = windows.block_size + 1
        starts, ends, per_document = [], [], []
        offset = 0
        for length in lengths:
            pieces = range(offset, offset + length, size)
            starts += list(pieces)
            ends += [offset + length] * len(pieces)
            per_document.append(len(pieces))
            offset += length + separator
        self.starts, self.ends = torch.tensor(starts), torch.tensor(ends)
        self.group = max(per_document)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts[index].clamp(max=self.windows.n_tokens - self.windows.block_size - 1)
        x, y = self.windows.batch(starts)
        # A window clamped back from the stream's end begins early; a shifted start never
        # happens for any document but the last, whose tail windows are then masked alike.
        position = starts.unsqueeze(1) + torch.arange(1, x.shape[1] + 1)
        outside = (position >= self.ends[index].unsqueeze(1)) | (position <= self.starts[index].unsqueeze(1))
        return x.masked_fill(outside, 0), y.masked_fill(outside, -100)


class ImageExamples:
    """One image is one example."""

    unit = "image"
    group = 1

    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.batch(index)


def private_examples(config: TrainConfig, data: Any, prepared: Any = None) -> Any:
    """The private examples of a run's training data (TrainingData; `prepared`, the prepared
    text, gives the documents for the document unit)."""
    if data.unit == "images":
        return ImageExamples(data.train)
    if config.dp_unit == "window":
        return DisjointWindows(data.train)
    tokenizer = prepared.tokenizer
    lengths = [sum(len(tokenizer.encode_array(chunk)) for chunk in doc.chunks()) for doc in prepared.split.train]
    return DocumentWindows(data.train, lengths, len(tokenizer.encode_array(DOCUMENT_SEPARATOR)))


# -- the private session -------------------------------------------------------------------

@dataclass
class Plan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    paced: bool = False  # remade from the measured pace of the steps (time budgets only)


class PrivateSource:
    """The wrapped training source: Poisson batches of examples, the accountant, the noise
    generator and the plan; what a checkpoint keeps of it restores all of them."""

    def __init__(self, examples: Any, engine: Any, optimizer: Any, noise: torch.Generator,
                 planner: Callable[[PrivateSource], Plan], config: TrainConfig, delta: float) -> None:
        self.examples, self.engine, self.optimizer, self.noise = examples, engine, optimizer, noise
        self.config, self.delta = config, delta
        self.sample_rate = config.batch_size / len(examples)
        self._planner = planner
        self._plan: Plan | None = None
        self._epsilon: tuple[int, float] = (0, 0.0)

    @property
    def plan(self) -> Plan:
        """Made when first needed, so that a resumed run takes its plan from the checkpoint
        instead of probing and searching again."""
        if self._plan is None:
            self.use_plan(self._planner(self))
        return self._plan

    def use_plan(self, plan: Plan) -> None:
        self._plan = plan
        self.optimizer.noise_multiplier = plan.noise_multiplier

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.engine.accountant.history)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Every example independently with probability q (the trainer's sampler generator,
        so its checkpointed state is the data position). An empty draw is drawn again: at
        the expected batch sizes allowed (e^-B < 1e-6) this changes nothing measurable."""
        while True:
            chosen = (torch.rand(len(self.examples), generator=generator) < self.sample_rate).nonzero()
            if len(chosen):
                return self.examples.batch(chosen.flatten())

    def epsilon(self) -> float:
        """Epsilon spent so far (the accountant's, at delta); computed once per step count."""
        if self._epsilon[0] != self.steps:
            spent = self.engine.accountant.get_epsilon(self.delta) if self.steps else 0.0
            self._epsilon = (self.steps, float(spent))
        return self._epsilon[1]

    def progress(self, elapsed: float | None = None) -> float:
        """Share of the planned steps taken: at 1 the target epsilon is spent and training stops.
        `elapsed` (seconds of training so far) lets a time-budgeted run remake its plan once."""
        budget = self.config.time_budget
        if budget is not None and elapsed is not None and not self.plan.paced \
                and MIN_PACED_STEPS <= self.steps < self.plan.steps \
                and (elapsed >= REPLAN_AT * budget or 2 * self.steps >= self.plan.steps):
            self.use_plan(self.paced_plan(elapsed, budget))
        return self.steps / self.plan.steps

    def paced_plan(self, elapsed: float, budget: float) -> Plan:
        """The plan for the rest of a time budget at the pace of the steps so far. The probe
        before the first step only guesses a step's cost: in bench/privacy.py it planned 61
        steps of the default GPT for 10 minutes, and they took 5. The steps that fit in the
        time left get the noise multiplier that makes the whole history (the steps taken keep
        their noise) spend exactly the target epsilon."""
        done = self.steps
        more = int((budget - elapsed) / (elapsed / done) / REPLAN_MARGIN)
        if self.config.max_steps is not None:
            more = min(more, self.config.max_steps - done)
        if more <= 0 or done + more == self.plan.steps:  # spent, or on plan: keep the noise
            return Plan(self.plan.noise_multiplier, self.sample_rate, done + max(more, 0), paced=True)
        accountant = type(self.engine.accountant)()

        def spent(sigma: float) -> float:
            accountant.history = [*self.engine.accountant.history, (sigma, self.sample_rate, more)]
            return accountant.get_epsilon(self.delta)

        # Bisection as in Opacus' get_noise_multiplier, over the noise of the remaining steps.
        # An accountant call can take seconds (PRV), so each noise level is evaluated once.
        target, low, high = self.config.dp_epsilon, 0.0, 10.0
        at_high = spent(high)
        while at_high > target:  # finite: noise this large makes the remaining steps cost ~0
            low, high = high, 2 * high
            at_high = spent(high)
        while target - at_high > EPSILON_TOLERANCE and high - low > 1e-4:
            middle = (low + high) / 2
            at_middle = spent(middle)
            if at_middle > target:
                low = middle
            else:
                high, at_high = middle, at_middle
        return Plan(high, self.sample_rate, done + more, paced=True)

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon()}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.engine.accountant.history],
                "noise": encode_rng_state(self.noise.get_state()),
                "plan": vars(self.plan)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.accountant.history = [tuple(h) for h in state["history"]]
        self.noise.set_state(decode_rng_state(state["noise"]))
        self.use_plan(Plan(**state["plan"]))

    def record(self) -> dict[str, Any]:
        """What the run records about its guarantee (summary.json, config.json, manifests)."""
        epsilon = self.epsilon()
        record = {"epsilon": epsilon, "target_epsilon": self.config.dp_epsilon, "delta": self.delta,
                  "unit": self.examples.unit, "examples": len(self.examples),
                  "accountant": self.config.dp_accountant, "noise_multiplier": self.plan.noise_multiplier,
                  "sample_rate": self.plan.sample_rate, "max_grad_norm": self.config.max_grad_norm,
                  "steps": self.steps, "planned_steps": self.plan.steps, "group": self.examples.group,
                  "window_tokens": getattr(self.examples, "window_tokens", None)}
        if self.examples.group > 1:
            record["document_epsilon"], record["document_delta"] = group_bound(epsilon, self.delta,
                                                                              self.examples.group)
        if self.config.init_from:
            record["covers"] = "the fine-tuning data only, not the data of the model it started from"
        return record


def expected_batch(sample_rate: float, n: int) -> int:
    return max(1, round(sample_rate * n))


def describe(record: dict[str, Any]) -> str:
    """The guarantee in one line: a manifest's claim and `trustgen info`."""
    unit = {"window": "one window of {w} tokens (a secret crossing two windows: group of 2)",
            "document": "one document",
            "image": "one training image"}[record["unit"]].format(w=record.get("window_tokens", "N"))
    line = f"trained with ({record['epsilon']:.3g}, {record['delta']:.2g})-DP, unit: {unit}"
    if record.get("group", 1) > 1:
        line += f" (a document of up to {record['group']} windows: ({record['document_epsilon']:.3g}, " \
                f"{record['document_delta']:.2g})-DP by group privacy)"
    if record.get("covers"):
        line += f"; covers {record['covers']}"
    return line


# -- making a model private ------------------------------------------------------------------

def check_private(config: TrainConfig, n_examples: int) -> float:
    """The delta to use, after refusing settings DP-SGD cannot honour; one sentence each."""
    if config.grad_accum != 1:
        raise TrustgenError("private training takes one Poisson batch per step; set batch_size, not grad_accum.")
    if config.compile:
        raise TrustgenError("private training does not support compile; leave it off.")
    if n_examples < 2:
        raise TrustgenError(f"private training needs at least 2 examples, got {n_examples}.")
    if config.batch_size >= n_examples:
        raise TrustgenError(f"batch_size ({config.batch_size}) must be smaller than the {n_examples} private "
                            "examples: Poisson sampling draws each with probability batch_size / examples.")
    if math.exp(-config.batch_size) > EMPTY_FLOOR:
        raise TrustgenError(f"private training needs batch_size of at least 14 (got {config.batch_size}): "
                            "smaller Poisson batches are too often empty.")
    delta = config.dp_delta if config.dp_delta is not None else default_delta(n_examples)
    if delta >= 1 / n_examples:
        raise TrustgenError(f"dp_delta ({delta:g}) must be below 1/N = {1 / n_examples:.3g} for the {n_examples} "
                            "private examples: a larger delta allows publishing an example outright.")
    return delta


def dp_layers(module: nn.Module) -> None:
    """Replace recurrent layers by Opacus' per-sample-gradient versions, in place and with the
    same weights; their state dicts keep torch's parameter names, so the run's checkpoint
    reads back into the plain model."""
    from opacus.layers import DPGRU, DPLSTM, DPRNN

    replacements = {nn.LSTM: DPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN}
    for name, child in list(module.named_children()):
        kind = replacements.get(type(child))
        if kind is None:
            dp_layers(child)
            continue
        extra = {"nonlinearity": child.nonlinearity} if isinstance(child, nn.RNN) else {}
        layer = kind(child.input_size, child.hidden_size, num_layers=child.num_layers, bias=child.bias,
                     batch_first=child.batch_first, dropout=child.dropout, **extra)
        layer.load_state_dict(child.state_dict())
        setattr(module, name, layer.to(next(child.parameters()).device))


def check_layers(module: nn.Module, family: str) -> None:
    """Refuse, naming the layer and the family, a layer Opacus cannot give per-sample gradients."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    if not errors:
        try:
            GradSampleModule.validate(module, strict=True)
        except NotImplementedError as exc:
            errors = exc.args[0]
    if errors:
        reason = " ".join(str(errors[0]).split())
        raise TrustgenError(f"private training cannot handle a layer of the {family} model: {reason}")


def private_target(model: nn.Module) -> nn.Module:
    """The part of the model that sees real data: all of it, or a GAN's discriminator."""
    return model.discriminator if family_of(model.family).objective == "adversarial" else model


def plan_steps(config: TrainConfig, step_seconds: float | None) -> int:
    steps = []
    if config.max_steps is not None:
        steps.append(config.max_steps)
    if config.time_budget is not None and step_seconds is not None:
        steps.append(max(1, int(config.time_budget / (step_seconds * PROBE_OVERHEAD))))
    return min(steps)


def probe_seconds(model: nn.Module, source: PrivateSource, batch_size: int) -> float:
    """Seconds of one private forward and backward pass, measured on a few batches with every
    random state put back and every gradient dropped afterwards."""
    generator = torch.Generator().manual_seed(0)
    target = private_target(model)
    saved = copy.deepcopy(model.state_dict())  # batch-norm statistics move in a forward pass
    with torch.random.fork_rng(devices=[]):
        times = []
        for _ in range(PROBE_STEPS + 1):
            batch = [t.to(next(target.parameters()).device) for t in source.sample(batch_size, generator)]
            started = time.perf_counter()
            loss = _probe_loss(model, batch)
            loss.backward()
            times.append(time.perf_counter() - started)
            for p in model.parameters():
                p.grad = None
                p.grad_sample = None
    model.load_state_dict(saved)
    return float(sorted(times[1:])[len(times[1:]) // 2])


def _probe_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    if family_of(model.family).objective == "adversarial":
        real, labels = batch
        labels = model.conditions(real, labels)
        return model.discriminator_loss(real, labels)[0] + model.generator_loss(len(real), labels, real.device)
    return model.loss(*batch)[0]


def private_wrap(config: TrainConfig, examples: Any) -> Any:
    """The trainer's wrap hook for private training on `examples` (anything with len() and
    batch(index)): Opacus' engine over the model (a GAN's discriminator), its optimizer
    and a Poisson source; see the module's docstring."""
    delta = check_private(config, len(examples))
    try:
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise TrustgenError("private training needs Opacus: pip install 'trustgen[privacy]'.") from None

    def wrap(model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], data: Any) -> tuple:
        target = private_target(model)
        family = model.family
        dp_layers(target)
        check_layers(target, family)
        name = "discriminator" if target is not model else "model"
        optimizer = make_optimizer(target, config, next(target.parameters()).device,
                                   lr=optimizers[name].param_groups[0]["lr"])
        engine = PrivacyEngine(accountant=config.dp_accountant)
        noise = torch.Generator(device=next(target.parameters()).device).manual_seed(config.seed + NOISE_SEED_OFFSET)
        sample_rate = config.batch_size / len(examples)
        loader = torch.utils.data.DataLoader(range(len(examples)), batch_size=config.batch_size)
        # wrap_model=False: the hooks go onto the module itself, so the model keeps its own
        # parameter names (the checkpoint is the plain model's) and is called as before.
        hooked, optimizer, _ = engine.make_private(
            module=target, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=config.max_grad_norm, noise_generator=noise, poisson_sampling=False, wrap_model=False)
        # Opacus derives q from the loader; our own Poisson sampler uses batch_size / N.
        optimizer.expected_batch_size = expected_batch(sample_rate, len(examples))
        optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

        def planner(source: PrivateSource) -> Plan:
            seconds = probe_seconds(model, source, config.batch_size) if config.time_budget is not None else None
            steps = plan_steps(config, seconds)
            sigma = get_noise_multiplier(target_epsilon=config.dp_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant=config.dp_accountant)
            return Plan(float(sigma), sample_rate, steps)

        if target is not model:
            # The generator's step runs back through the frozen discriminator: no per-sample
            # gradients to take there, and Opacus' hooks must sit it out.
            target.register_forward_pre_hook(
                lambda module, _: setattr(hooked, "hooks_enabled", any(p.requires_grad for p in module.parameters())))
        return model, {**optimizers, name: optimizer}, PrivateSource(examples, engine, optimizer, noise, planner,
                                                                     config, delta)

    return wrap


__all__ = ["DisjointWindows", "DocumentWindows", "ImageExamples", "Plan", "PrivateSource", "default_delta",
           "describe", "group_bound", "private_wrap"]
