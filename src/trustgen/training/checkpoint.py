"""Checkpoints a run resumes from exactly: model weights, optimizer states and the trainer's
state (step, counters, every random state), written together and atomically into the run
directory as model.safetensors, optimizer.safetensors and trainer_state.json.

Never pickle: optimizer states become flat safetensors (tensors) plus JSON (parameter groups),
random generator states become base64 text.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustgen import io

Optimizers = dict[str, torch.optim.Optimizer]


def save_checkpoint(run_dir: Path, model: nn.Module, optimizers: Optimizers, state: dict[str, Any],
                    extra_files: dict[str, bytes] | None = None) -> None:
    """Commit the model, the optimizers (by name), `state` (JSON-able; the optimizers'
    parameter groups are added to it) and any `extra_files` (name: bytes) in one atomic
    multi-file write."""
    meta = {"step": str(state.get("step", 0))}
    tensors, groups = {}, {}
    for name, optimizer in optimizers.items():
        flat, groups[name] = flatten_optimizer(optimizer.state_dict())
        tensors.update({f"{name}.{key}": value for key, value in flat.items()})
    state = {**state, "optimizer_param_groups": groups}
    io.commit_files(Path(run_dir), {
        "model.safetensors": io.weights_bytes(model, meta),
        "optimizer.safetensors": io.tensors_to_bytes(tensors, meta),
        "trainer_state.json": io.json_bytes(state),
        **(extra_files or {}),
    })


def read_trainer_state(run_dir: Path) -> dict[str, Any]:
    """The trainer state of a run's last checkpoint (finishing or undoing an interrupted write first)."""
    io.recover(Path(run_dir))
    return io.read_json(Path(run_dir) / "trainer_state.json")


def load_checkpoint(run_dir: Path, model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
    """Load the last checkpoint's weights into `model` and optimizer states into `optimizers`;
    returns the trainer state. Raises KeyError, ValueError, ... on a foreign or corrupt state."""
    run_dir = Path(run_dir)
    state = read_trainer_state(run_dir)
    io.load_weights(model, io.read_tensors(run_dir / "model.safetensors"), run_dir / "model.safetensors")
    tensors = io.read_tensors(run_dir / "optimizer.safetensors")
    for name, optimizer in optimizers.items():
        own = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.split(".", 1)[0] == name}
        optimizer.load_state_dict(unflatten_optimizer(own, state["optimizer_param_groups"][name]))
        match_layouts(optimizer)
    return state


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment its parameter's memory layout: files hold contiguous tensors,
    but a channels-last parameter's moments are channels-last, and the fused Adam kernel walks
    them with the parameter's strides."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def encode_rng_state(state: torch.Tensor) -> str:
    """A generator's state (a uint8 tensor) as base64 text for JSON."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_rng_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


__all__ = ["decode_rng_state", "encode_rng_state", "flatten_optimizer", "load_checkpoint", "match_layouts",
           "read_trainer_state", "save_checkpoint", "unflatten_optimizer"]
