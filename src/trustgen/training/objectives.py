"""What a training step optimises. A family's contract names its objective (`Family.objective`);
`make_objective` maps that name to the class that plays it:

- "likelihood": `Likelihood`, one optimizer minimising the model's own `loss(*batch)`
  (next-token cross-entropy, a VAE's negative ELBO, a classifier's cross-entropy);
- "adversarial": `training.adversarial.Adversarial`, the GAN's two-optimizer game.

An objective holds the model it trains and its optimizers by name (`optimizers`, which
checkpoints save and load); `step(batches, lr, autocast)` takes one optimizer step over a list
of batches (gradient accumulation) and returns the training losses; `evaluate(batches, autocast)`
returns validation losses; `use(model, optimizers)` swaps in wrapped versions of both (the
trainer's `wrap` hook: a privacy engine's per-sample-gradient module and noisy optimizer).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from trustgen.config import TrainConfig
from trustgen.models.registry import family_of
from trustgen.runtime import to_device
from trustgen.training.adversarial import Adversarial
from trustgen.training.optim import make_optimizer, set_learning_rate

Batch = tuple[torch.Tensor, ...]


class Objective(Protocol):
    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    metric_names: tuple[str, ...]

    def step(self, batches: list[Batch], lr: float, autocast: Any) -> dict[str, float]: ...

    def evaluate(self, batches: Iterator[Batch], autocast: Any) -> dict[str, float]: ...

    def use(self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None: ...


class Likelihood:
    """One optimizer minimising the model's own `loss(*batch) -> (loss, terms)`."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.terms = tuple(model.loss_terms)
        self.metric_names = (*self.terms, *(f"val_{t}" for t in self.terms))
        self.use(model, {"model": make_optimizer(model, config, device)})

    def use(self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.model, self.optimizers = model, optimizers
        self.loss_fn = torch.compile(model.loss) if self.config.compile else model.loss

    def step(self, batches: list[Batch], lr: float, autocast: Any) -> dict[str, float]:
        optimizer = self.optimizers["model"]
        set_learning_rate(optimizer, lr)
        totals = dict.fromkeys(("train_loss", *self.terms), 0.0)
        for batch in batches:
            with autocast:
                loss, terms = self.loss_fn(*to_device(batch, self.device))
            (loss / len(batches)).backward()
            for name, value in (("train_loss", loss), *terms.items()):
                totals[name] += value.item() / len(batches)
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return totals

    @torch.no_grad()
    def evaluate(self, batches: Iterator[Batch], autocast: Any) -> dict[str, float]:
        """Validation loss and terms, averaged over rows."""
        sums: dict[str, float] = {}
        rows = 0
        for batch in batches:
            with autocast:
                loss, terms = self.loss_fn(*to_device(batch, self.device))
            n = len(batch[0])
            rows += n
            for name, value in (("val_loss", loss), *((f"val_{k}", v) for k, v in terms.items())):
                sums[name] = sums.get(name, 0.0) + value.item() * n
        return {name: total / rows for name, total in sums.items()}


OBJECTIVES: dict[str, type] = {"likelihood": Likelihood, "adversarial": Adversarial}


def make_objective(model: nn.Module, config: TrainConfig, device: torch.device) -> Objective:
    """The objective the model's family names, with fresh optimizers; a module outside the
    registry of families (no `family` attribute) is trained by its own `loss`."""
    name = family_of(model.family).objective if hasattr(model, "family") else "likelihood"
    return OBJECTIVES[name](model, config, device)


__all__ = ["OBJECTIVES", "Adversarial", "Likelihood", "Objective", "make_objective"]
