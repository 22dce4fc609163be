"""The char-RNN family: an embedding, a stack of recurrent layers and a linear read-out.

`cell` picks the recurrence: `rnn` is the Elman network of the classic char-RNN example
(Elman 1990; Karpathy 2015), `gru` (Cho et al. 2014) and `lstm` (Hochreiter & Schmidhuber 1997)
are the gated ones. Done right: the read-out gives raw logits straight to cross-entropy (no
softmax before the loss), and during generation the hidden state is carried from each step to
the next instead of being reset (`run` takes and returns it; trustgen.sample.kv_cache keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from trustgen.config import Config, check
from trustgen.models.gpt import next_token_loss

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class RNNConfig(Config):
    vocab_size: int = 256
    block_size: int = 128  # training window (truncated back-propagation length)
    cell: Literal["rnn", "gru", "lstm"] = "lstm"
    n_layer: int = 2
    hidden_size: int = 512
    embed_size: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "hidden_size", "embed_size"):
            check(getattr(self, name) >= 1, f"RNNConfig.{name} must be at least 1, got {getattr(self, name)}.")
        check(0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}.")


_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class CharRNN(nn.Module):
    family = "rnn"
    loss_terms: tuple[str, ...] = ()

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        self.rnn = _CELLS[config.cell](
            config.embed_size, config.hidden_size, num_layers=config.n_layer, batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    @property
    def context_limit(self) -> int | None:
        return None  # the state summarises any length of history

    @property
    def n_blocks(self) -> int:
        return self.config.n_layer

    def frozen_prefix(self, n_blocks: int) -> list[nn.Parameter | nn.Module]:
        """The embedding and the parameters of the first `n_blocks` recurrent layers."""
        layers = [p for name, p in self.rnn.named_parameters()
                  if int(name.rsplit("_l", 1)[1].split("_")[0]) < n_blocks]
        return [self.embed, *layers]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size), from a zero state."""
        return self.run(idx)[0]

    def run(self, idx: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """Token ids (B, T) from `hidden` (None: zeros) -> logits (B, T, vocab_size) and the state
        after the last token, to carry into the next call."""
        out, hidden = self.rnn(self.embed(idx), hidden)
        return self.head(self.drop(out)), hidden

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return next_token_loss(self(idx), targets), {}

    def read_prompts(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Hidden]:
        """Run prompts of any lengths; return each one's last logits (B, V) and the state after
        its own last token."""
        device = self.embed.weight.device
        lengths = torch.tensor([len(p) for p in prompts])
        idx = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            idx[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        # Packing makes each row's final state the one after its own last token.
        packed = pack_padded_sequence(self.embed(idx), lengths, batch_first=True, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        last = out[torch.arange(len(prompts)), lengths.to(device) - 1]
        return self.head(last), hidden
