"""Weight-only int8 quantization for fast inference.

Each linear layer's weight is stored as int8 with one scale per output channel (symmetric,
absmax / 127); activations stay in bf16. Decoding one token at a time is bound by reading
weights, so a quarter of fp32's bytes and PyTorch's int8 matrix-vector kernel
(`_weight_int8pack_mm`, the kernel gpt-fast uses) make it several times faster on CPUs. The
rounding error per weight is at most half a step of its channel's scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_BLOCK = 16


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights and per-output-channel bf16 scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        # Quantize against the bf16 scale the kernel will use, so rounding stays within half a step.
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        steps = torch.round(weight / scales.float()[:, None]).clamp(-127, 127)
        # The CPU kernel reads the inner dimension in blocks of 16 and returns garbage (or
        # crashes) otherwise: pad with zero weights, which add nothing to the product.
        self.padding = -linear.in_features % KERNEL_BLOCK
        self.register_buffer("weight", F.pad(steps, (0, self.padding)).to(torch.int8))
        self.register_buffer("scales", scales)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # The kernel reads rows as dense memory: a strided view (an earlier kernel's output can
        # carry row padding) must be made contiguous first, or it reads out of bounds.
        flat = F.pad(x.reshape(-1, self.in_features).to(torch.bfloat16), (0, self.padding)).contiguous()
        if flat.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            out = torch._weight_int8pack_mm(flat, self.weight, self.scales)
        else:  # devices without the fused kernel dequantize on the fly
            out = F.linear(flat, self.weight.to(torch.bfloat16) * self.scales[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by an Int8Linear; the rest becomes bf16."""

    def replace(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
            else:
                replace(child)

    replace(model)
    return model.to(torch.bfloat16)  # only floating tensors change: the int8 weights stay
