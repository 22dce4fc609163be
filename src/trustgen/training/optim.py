"""The optimizer and its schedule: AdamW with parameter groups, linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from trustgen.config import TrainConfig


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_learning_rate over `progress`."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_learning_rate + cosine * (config.learning_rate - config.min_learning_rate)


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings only, never on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": lr or config.learning_rate, "betas": (config.beta1, config.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels are missing for this device or version
        return torch.optim.AdamW(groups, foreach=device.type != "cpu" or None, **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["learning_rate", "make_optimizer", "set_learning_rate"]
