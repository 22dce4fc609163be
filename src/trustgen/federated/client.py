"""What a data owner's ClientApp does with a round's message: train or evaluate locally.

The global weights arrive with the run's configuration (model family and settings, training
settings, tokenizer); the client's data stays in its data folder (`train.txt` and `val.txt`,
or `train.npz` and `val.npz` of images). Training is trustgen's own `train_steps`, so every
family trains the same way here as alone. What a family keeps local (`Family.local_state`: a
GAN's discriminator) never leaves the client: it is saved in the data folder after each round
(`local_state/round-R.safetensors`) and the next round starts from the client's latest one
before it, so a resumed federation that repeats a round repeats it bit for bit; a client's
first round starts from the run's initial weights (the model built from the run's seed). FedProx (Li et al. 2020, arXiv:1812.06127) adds mu * (w - w_global) to each gradient
before the optimizer step, the gradient of (mu / 2) * ||w - w_global||^2.

With client-side differential privacy, the update (new weights minus the global ones) is
clipped to an L2 norm of at most C and Gaussian noise of standard deviation
sigma * C is added to every coordinate, sigma = sqrt(2 ln(1.25/delta)) / epsilon (the Gaussian
mechanism, Dwork & Roth 2014, Thm. A.1; what Flower's LocalDpMod applies): each round's update
is (epsilon, delta)-DP with respect to everything the client holds. The noise is drawn from the
operating system's randomness, which the server cannot replay, so a resumed federation with
client DP continues correctly but does not repeat the lost rounds bit for bit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustgen import io
from trustgen.config import TrainConfig
from trustgen.data.images import ImageBatches
from trustgen.data.text import Document, TokenWindows, tokenize_to_file
from trustgen.data.tokenizers import tokenizer_from_json
from trustgen.errors import TrustgenError
from trustgen.federated.partition import read_client_images
from trustgen.models.registry import build_model, family_of
from trustgen.runtime import private_rng, resolve_device
from trustgen.training.data import TrainingData
from trustgen.training.trainer import Optimizers, Trainer, train_steps


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A client's seed for one round: the same run, round and client draw the same batches,
    which is what makes a resumed federation repeat the rounds it lost."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


LOCAL_STATE = "local_state"  # the folder, in a client's data folder, of what it keeps to itself


def client_data(data_dir: Path, settings: dict[str, Any]) -> TrainingData:
    """The client's training and held-out images, or windows tokenized with the federation's
    tokenizer (cached by content, so later rounds read the token files only)."""
    if family_of(settings["family"]).modality == "image":
        train, val = read_client_images(data_dir)
        return TrainingData(ImageBatches(train), ImageBatches(val), {}, "images", 1)
    tokenizer = tokenizer_from_json(settings["tokenizer"])
    block_size = settings["model"]["block_size"]
    splits = []
    for name in ("train.txt", "val.txt"):
        path = Path(data_dir) / name
        if not path.is_file():
            raise TrustgenError(f"the client data folder {data_dir} has no {name}.")
        splits.append(TokenWindows(tokenize_to_file([Document(name, path)], tokenizer), block_size))
    return TrainingData(splits[0], splits[1], {}, "tokens", block_size)


def global_model(settings: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The model with the weights received; what the server does not send (a family's local
    state) holds the run's initial weights, built from its seed as the server built them."""
    family = family_of(settings["family"])
    with private_rng(settings["train"]["seed"]):
        model = build_model(settings["family"], family.make_config(settings["model"]))
    model.load_state_dict(state, strict=not family.local_state)
    return model


def _local_rounds(data_dir: Path) -> dict[int, Path]:
    folder = Path(data_dir) / LOCAL_STATE
    return {int(p.stem.split("-")[1]): p for p in folder.glob("round-*.safetensors")} if folder.is_dir() else {}


def load_local_state(model: nn.Module, data_dir: Path, server_round: int) -> None:
    """Load the client's own state (e.g. its discriminator) from its latest round before this one."""
    earlier = [r for r in _local_rounds(data_dir) if r < server_round]
    if earlier:
        model.load_state_dict(io.read_tensors(_local_rounds(data_dir)[max(earlier)]), strict=False)


def save_local_state(model: nn.Module, prefixes: tuple[str, ...], data_dir: Path, server_round: int) -> None:
    """Keep what this round left in the state the client keeps to itself; drop what no later
    round will read (older rounds but the one this round started from, and any later ones: a
    federation resumed from before them)."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    folder = Path(data_dir) / LOCAL_STATE
    folder.mkdir(exist_ok=True)
    io.atomic_write_bytes(folder / f"round-{server_round}.safetensors", io.tensors_to_bytes(tensors))
    rounds = _local_rounds(data_dir)
    started_from = max((r for r in rounds if r < server_round), default=None)
    for r, path in rounds.items():
        if r > server_round or (started_from is not None and r < started_from):
            path.unlink(missing_ok=True)


def proximal_wrap(mu: float, anchor: dict[str, torch.Tensor]) -> Any:
    """A `train_steps` wrap that adds FedProx's proximal gradient before every optimizer step."""
    def wrap(model: nn.Module, optimizers: Optimizers, data: Any) -> tuple[nn.Module, Optimizers, Any]:
        pairs = [(p, anchor[name].to(p.device)) for name, p in model.named_parameters()
                 if p.requires_grad and name in anchor]  # not a family's local state

        def pull_towards_global(*_: Any) -> None:
            for p, p0 in pairs:
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=mu)

        for optimizer in optimizers.values():
            optimizer.register_step_pre_hook(pull_towards_global)
        return model, optimizers, data
    return wrap


def noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian mechanism's sigma (noise std per unit of sensitivity) for (epsilon, delta)."""
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def privatize_update(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], clip: float, epsilon: float,
                     delta: float, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """The new weights with the update clipped to L2 norm `clip` and Gaussian noise added for
    (epsilon, delta)-DP; also the update's norm before clipping."""
    keys = [k for k, v in new.items() if v.is_floating_point()]
    update = {k: new[k].double() - old[k].double() for k in keys}
    norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier(epsilon, delta) * clip
    if generator is None:  # a secret seed: the server must not be able to subtract the noise
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    out = dict(new)
    for k in keys:
        noise = torch.randn(update[k].shape, generator=generator, dtype=torch.float64) * std
        out[k] = (old[k].double() + update[k] * scale + noise).to(new[k].dtype)
    return out, norm


def train_locally(state: dict[str, torch.Tensor], settings: dict[str, Any], data_dir: Path, partition_id: int,
                  server_round: int, proximal_mu: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training: the new weights (those received) and the metrics to send
    back: the mean training losses, and the received model's loss on the client's first batch
    (`global-train-loss`, what q-FedAvg weighs clients by)."""
    config = TrainConfig.from_dict(settings["train"])
    data = client_data(data_dir, settings)
    model = global_model(settings, state)
    local = family_of(settings["family"]).local_state
    if local:
        load_local_state(model, data_dir, server_round)
    wrap = proximal_wrap(proximal_mu, state) if proximal_mu > 0 else None
    first: dict[str, float] = {}
    stats = train_steps(model, data.train, config, settings["local_steps"], resolve_device(config.device),
                        seed=round_seed(config.seed, server_round, partition_id), wrap=wrap,
                        on_step=lambda step, losses: first.update(losses) if step == 1 else None)
    if local:
        save_local_state(model, local, data_dir, server_round)
    trained = model.state_dict()
    new_state = {k: trained[k].detach().cpu() for k in state}
    metrics = {**{k: v for k, v in stats.items() if k not in ("steps", "rows")}, "num-examples": stats["rows"],
               "partition-id": partition_id}
    if "train_loss" in first:
        metrics["global-train-loss"] = first["train_loss"]
    dp = settings.get("client_dp")
    if dp:
        new_state, norm = privatize_update(new_state, state, dp["clip"], dp["epsilon"], dp["delta"])
        metrics |= {"dp-epsilon": dp["epsilon"], "dp-delta": dp["delta"], "update-norm": norm}
    return new_state, metrics


def evaluate_locally(state: dict[str, torch.Tensor], settings: dict[str, Any], data_dir: Path,
                     partition_id: int) -> dict[str, float]:
    """The global model's loss on the client's whole held-out data (nats per token or image)."""
    config = TrainConfig.from_dict(settings["train"])
    data = client_data(data_dir, settings)
    model = global_model(settings, state)
    losses = Trainer(None, config, model, data, resolve_device(config.device)).evaluate(full=True)
    held_out = data.val.n_tokens if data.unit == "tokens" else len(data.val)
    return {"val_loss": losses["val_loss"], "num-examples": held_out, "partition-id": partition_id}


__all__ = ["evaluate_locally", "noise_multiplier", "privatize_update", "round_seed", "train_locally"]
