"""A decoder-only transformer (GPT), readable top to bottom.

The defaults are GPT-2's design (Radford et al. 2019): learned positions, LayerNorm, GELU,
tied input/output embeddings. Modern options sit beside them: rotary positions (RoPE, Su et al.
2021, arXiv:2104.09864), RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) and the SwiGLU
feed-forward (Shazeer 2020, arXiv:2002.05202). Attention runs through
`scaled_dot_product_attention`; for incremental decoding it reads and writes a key/value cache
that `trustgen.sample.kv_cache` keeps.

Every parameter lives inside a leaf module (Embedding, Linear, LayerNorm...), and position ids
are passed as a full (B, T) tensor: both keep per-sample-gradient tools such as Opacus working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trustgen.config import Config, check


@dataclass(frozen=True, kw_only=True)
class GPTConfig(Config):
    """The defaults are the model `trustgen demo` trains: the best validation loss on held-out
    Shakespeare plays we measured for 5 minutes on a 2-core CPU (see bench/quality.py). The
    modern options learned faster per second there than GPT-2's (1.57 against 1.68 nats/char);
    choose learned/layernorm/gelu (or gelu_tanh) for a model that exports to GPT-2."""

    vocab_size: int = 256
    block_size: int = 256  # longest context the model attends over
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    position: Literal["learned", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "swiglu"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check(getattr(self, name) >= 1, f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}.")
        check(self.n_embd % self.n_head == 0,
              f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
        check(self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0,
              "rotary positions need an even head size (n_embd / n_head).")
        check(0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}.")


class KVSpec(NamedTuple):
    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding to (B, n_head, T, head_dim) with cos/sin of shape (B, 1, T, head_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: Any, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        causal = mask is None
        if cache is not None:  # keys and values of earlier tokens join the new ones
            k, v, from_start = cache.write(layer, k, v)
            causal = causal and from_start
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


def swiglu_width(n_embd: int) -> int:
    """The hidden width of the SwiGLU feed-forward: 2/3 of 4x keeps the parameter count of a
    plain 4x MLP (Shazeer 2020)."""
    return int(8 * n_embd / 3)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        if config.mlp == "swiglu":
            hidden = swiglu_width(config.n_embd)
            self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        else:
            hidden = 4 * config.n_embd
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = _norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: Any, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rope, cache, layer, mask))
        return x + self.mlp(self.norm2(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of logits (B, T, V) against the next tokens (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class GPT(nn.Module):
    family = "gpt"
    loss_terms: tuple[str, ...] = ()

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def context_limit(self) -> int | None:
        return self.config.block_size

    def frozen_prefix(self, n_blocks: int) -> list[nn.Module]:
        """The embeddings and the first `n_blocks` blocks (for fine-tuning with frozen layers)."""
        return [m for m in (self.wte, self.wpe) if m is not None] + list(self.blocks[:n_blocks])

    @property
    def n_blocks(self) -> int:
        return self.config.n_layer

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                cache: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size). With a `cache` (trustgen.sample.kv_cache),
        attention also sees the keys and values of earlier tokens, and stores the new ones."""
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = self._rope_angles(positions) if self.config.position == "rope" else None
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, mask)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return next_token_loss(self(idx), targets), {}

    def _rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, head_dim/2) of each position's rotation angles, in float32.

        Computed per call rather than stored as buffers, so casting the model to bf16 for
        inference never rounds the angles."""
        head_dim = self.config.n_embd // self.config.n_head
        exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
        angles = positions.unsqueeze(-1).float() * self.config.rope_theta ** -exponents
        return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)

    def kv_spec(self) -> KVSpec:
        """What a key/value cache of this model holds (trustgen.sample.kv_cache builds it)."""
        weight = self.wte.weight
        return KVSpec(self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head,
                      weight.dtype, weight.device)
