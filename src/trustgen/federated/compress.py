"""Compressed client updates: what a client sends is its update (new weights minus the global
ones it received) in bf16 (2 bytes a weight) or int8 (1 byte, one float32 scale per tensor:
the tensor's largest magnitude / 127, rounded to nearest), and the server adds the decoded update
to the global weights before aggregating. fp32 sends the weights themselves. Only floating-point
tensors are compressed; the rest travel as they are."""

from __future__ import annotations

import torch

SCALE = "#scale"  # suffix of an int8 tensor's scale


def encode_update(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor],
                  precision: str) -> dict[str, torch.Tensor]:
    if precision == "fp32":
        return new
    out = {}
    for key, value in new.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        update = value.float() - old[key].float()
        if precision == "bf16":  # the bits of a bf16, as int16 (numpy has no bf16)
            out[key] = update.to(torch.bfloat16).view(torch.int16)
        else:
            scale = update.abs().max().clamp_min(1e-30) / 127
            out[key] = torch.round(update / scale).clamp(-127, 127).to(torch.int8)
            out[key + SCALE] = scale.reshape(1)
    return out


def decode_update(sent: dict[str, torch.Tensor], old: dict[str, torch.Tensor],
                  precision: str) -> dict[str, torch.Tensor]:
    if precision == "fp32":
        return sent
    out = {}
    for key, value in old.items():
        if not value.is_floating_point():
            out[key] = sent[key]
        elif precision == "bf16":
            out[key] = (value.float() + sent[key].view(torch.bfloat16).float()).to(value.dtype)
        else:
            out[key] = (value.float() + sent[key].float() * sent[key + SCALE]).to(value.dtype)
    return out


__all__ = ["decode_update", "encode_update"]
