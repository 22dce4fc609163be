"""The GAN step: the two-player game inside the one training loop.

Each step first updates the discriminator on a batch of real images against fresh fakes (plus
the lazy R1 penalty every `r1_interval` steps), then the generator against the updated
discriminator, then the generator's moving average. Two Adam optimizers with their own learning
rates (the two time-scale update rule, Heusel et al. 2017) follow the loop's schedule together;
their states are checkpointed with the rest, so a resumed GAN continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from trustgen.config import TrainConfig
from trustgen.errors import TrustgenError
from trustgen.models.gan import GAN
from trustgen.runtime import to_device
from trustgen.training.optim import make_optimizer, set_learning_rate

EMA_WARMUP_STEPS = 10  # the average starts fast, so early samples are not the random init


class Adversarial:
    metric_names = ("d_loss", "g_loss", "r1", "d_real", "d_fake")

    def __init__(self, model: GAN, config: TrainConfig, device: torch.device) -> None:
        if config.compile:
            raise TrustgenError("compile is not supported for GAN training; leave it off.")
        if config.grad_accum != 1:
            raise TrustgenError("GAN training takes one batch per step; set batch_size, not grad_accum.")
        self.model, self.config, self.device = model, config, device
        self.d_lr_ratio = (config.discriminator_lr or config.learning_rate) / config.learning_rate
        self.optimizers = {
            "generator": make_optimizer(model.generator, config, device),
            "discriminator": make_optimizer(model.discriminator, config, device,
                                            lr=config.learning_rate * self.d_lr_ratio),
        }

    def use(self, model: GAN, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.model, self.optimizers = model, optimizers

    def step(self, batches: list[tuple[torch.Tensor, ...]], lr: float, autocast: Any) -> dict[str, float]:
        (batch,) = batches
        real, labels = to_device(batch, self.device)
        labels = self.model.conditions(real, labels)  # classes, clusters or None; outside autocast
        g_opt, d_opt = self.optimizers["generator"], self.optimizers["discriminator"]
        set_learning_rate(g_opt, lr)
        set_learning_rate(d_opt, lr * self.d_lr_ratio)
        step = self._step_number()

        self.model.generator.requires_grad_(False)
        with autocast:
            d_loss, terms = self.model.discriminator_loss(real, labels)
        d_loss.backward()
        r1 = torch.zeros(())
        if self.model.config.r1_gamma > 0 and step % self.model.config.r1_interval == 0:
            # Second derivatives stay in float32: bf16 double-backward is neither fast nor exact.
            with torch.autocast(self.device.type, enabled=False):
                r1 = self.model.r1_penalty(real, labels)
            r1.backward()
        d_opt.step()
        d_opt.zero_grad(set_to_none=True)
        self.model.generator.requires_grad_(True)

        self.model.discriminator.requires_grad_(False)
        with autocast:
            g_loss = self.model.generator_loss(len(real), labels, self.device)
        g_loss.backward()
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)
        self.model.discriminator.requires_grad_(True)
        self.model.update_ema(min(self.model.config.ema_decay, (1 + step) / (EMA_WARMUP_STEPS + step)))

        return {"d_loss": d_loss.item(), "g_loss": g_loss.item(),
                "r1": r1.item(), **{k: v.item() for k, v in terms.items()}}

    def _step_number(self) -> int:
        """Steps taken so far, read from Adam's own counter so it survives a resume."""
        state = self.optimizers["generator"].state
        for values in state.values():
            return int(values["step"].item())
        return 0

    def evaluate(self, batches: Iterator[tuple[torch.Tensor, ...]], autocast: Any) -> dict[str, float]:
        """A GAN has no held-out likelihood; `trustgen evaluate` measures its samples instead."""
        return {}
