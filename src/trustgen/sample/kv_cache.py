"""What a text model remembers of the tokens it has read, so that each new token costs one step.

A transformer keeps the keys and values of every layer (`KVCache` for a batch of prompts that
decode together, `RaggedKVCache` for continuous batching, where sequences join and leave); a
recurrent network keeps its hidden state (`RecurrentState`). The family registry says which a
family uses (`Family.decoding`), and `decoding_for(model)` gives the three functions every
decoder calls, whatever the family:

    logits, state = decoding.prefill(model, prompts, capacity)   # last logits (B, V)
    logits = decoding.decode_step(model, tokens, state)          # one new token per row
    batch = decoding.batch_cache(model, slots, capacity)         # empty; state.add / .remove

The models themselves only read and write a state handed to them: a transformer's attention
calls `cache.write(layer, keys, values)` and its forward `cache.advance(tokens)`; a recurrent
network takes and returns its hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from trustgen.errors import TrustgenError
from trustgen.models.registry import family_of
from trustgen.models.rnn import Hidden


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to `capacity`.

    Prompts of different lengths are left-padded; `key_valid` marks the real positions (None
    when there is no padding, which keeps attention on its fast path).
    """

    keys: list[torch.Tensor]  # per layer (B, n_head, capacity, head_dim)
    values: list[torch.Tensor]
    key_valid: torch.Tensor | None  # (B, capacity) bool
    next_position: torch.Tensor  # (B,) position id of the next token of each row
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Store the new keys and values (B, n_head, T, head_dim) of one layer after the cached
        ones; return every key and value so far, and whether plain causal attention is right
        (a prompt on an empty cache; a single new token may see every cached key)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], start == 0 and k.shape[2] > 1

    def advance(self, tokens: int) -> None:
        """The forward pass has written `tokens` new positions in every layer."""
        self.length += tokens

    def padding_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, length+T) bool: causal, padded keys hidden; a padded query sees itself so
        that no row of the softmax is empty."""
        end = self.length + T
        query_pos = torch.arange(self.length, end, device=self.key_valid.device)
        key_pos = torch.arange(end, device=self.key_valid.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # (T, end)
        own = key_pos[None, :] == query_pos[:, None]
        mask = causal[None] & (self.key_valid[:, None, :end] | own[None])
        return mask.unsqueeze(1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)


@dataclass
class RaggedKVCache:
    """The cache of a changing set of sequences of different lengths (continuous batching).

    Row i holds its sequence's keys and values in columns [0, lengths[i]) and writes its next
    token at column lengths[i], so rows never wait for each other and need no padding. Rows
    [0, rows) are in use: a sequence joins by copying its prefilled cache into row `rows`, and
    leaves by moving the last row into its place, so each change copies one row, never the batch.
    """

    keys: list[torch.Tensor]  # per layer (slots, n_head, capacity, head_dim)
    values: list[torch.Tensor]
    lengths: torch.Tensor  # (slots,) tokens held by each row
    rows: int = 0
    window: int = 0  # keys the current step attends to: the longest row's, plus its new token
    same_length: bool = False  # every row holds window - 1 tokens: the step writes one column

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def add(self, cache: KVCache) -> int:
        """Take one prefilled, unpadded sequence; returns its row."""
        if self.rows == self.keys[0].shape[0]:
            raise TrustgenError(f"the batch is full ({self.rows} sequences).")
        length, row = cache.length, self.rows
        for mine, theirs in zip(self.keys + self.values, cache.keys + cache.values, strict=True):
            mine[row, :, :length] = theirs[0, :, :length]
        self.lengths[row] = length
        self.rows += 1
        return row

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers renumber it)."""
        last = self.rows - 1
        if row != last:
            for tensor in self.keys + self.values:
                tensor[row] = tensor[last]
            self.lengths[row] = self.lengths[last]
        self.rows = last

    def start_step(self) -> torch.Tensor | None:
        """Prepare a step of one new token per row; returns the attention mask it needs (None
        when every row has the same length: attention then keeps its fast path)."""
        lengths = self.lengths[: self.rows]
        known = lengths.tolist()
        longest, shortest = max(known), min(known)
        if longest >= self.capacity:
            raise TrustgenError(f"a sequence reached the cache's capacity of {self.capacity} tokens.")
        self.window = longest + 1
        self.same_length = shortest == longest
        if self.same_length:
            return None
        key_pos = torch.arange(self.window, device=lengths.device)
        return (key_pos[None, :] <= lengths[:, None])[:, None, None, :]  # (B, 1, 1, window)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Store one new token's key and value per row, each at its own column; return the keys
        and values of the step's window (never plain causal: the rows differ in length)."""
        B = k.shape[0]
        if self.same_length:  # a plain slice write is several times cheaper than scattering
            self.keys[layer][:B, :, self.window - 1] = k[:, :, 0]
            self.values[layer][:B, :, self.window - 1] = v[:, :, 0]
        else:
            rows = torch.arange(B, device=k.device)
            self.keys[layer][rows, :, self.lengths[:B]] = k[:, :, 0].to(self.keys[layer].dtype)
            self.values[layer][rows, :, self.lengths[:B]] = v[:, :, 0].to(self.values[layer].dtype)
        return self.keys[layer][:B, :, : self.window], self.values[layer][:B, :, : self.window], False

    def advance(self, tokens: int) -> None:
        self.lengths[: self.rows] += tokens


@dataclass
class RecurrentState:
    """A recurrent network's hidden state for a batch of rows (layers first, rows second)."""

    hidden: Hidden | None

    def reorder(self, index: torch.Tensor) -> None:
        self.hidden = _each(self.hidden, lambda h: h.index_select(1, index))

    @property
    def rows(self) -> int:
        if self.hidden is None:
            return 0
        return (self.hidden[0] if isinstance(self.hidden, tuple) else self.hidden).shape[1]

    def add(self, other: RecurrentState) -> int:
        """Append another state's single row (continuous batching); returns its row."""
        if self.hidden is None:
            self.hidden = other.hidden
        elif isinstance(self.hidden, tuple):
            self.hidden = tuple(torch.cat([mine, theirs], dim=1) for mine, theirs in zip(self.hidden, other.hidden, strict=True))
        else:
            self.hidden = torch.cat([self.hidden, other.hidden], dim=1)
        return self.rows - 1

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place, as in RaggedKVCache."""
        order = list(range(self.rows - 1))
        if row < len(order):
            order[row] = self.rows - 1
        self.reorder(torch.tensor(order, dtype=torch.long, device=self.device))

    @property
    def device(self) -> torch.device:
        return (self.hidden[0] if isinstance(self.hidden, tuple) else self.hidden).device


def _each(hidden: Hidden | None, change: Any) -> Hidden | None:
    if hidden is None:
        return None
    return tuple(change(h) for h in hidden) if isinstance(hidden, tuple) else change(hidden)


class Decoding(Protocol):
    def prefill(self, model: nn.Module, prompts: list[list[int]], capacity: int) -> tuple[torch.Tensor, Any]: ...
    def decode_step(self, model: nn.Module, tokens: torch.Tensor, state: Any) -> torch.Tensor: ...
    def batch_cache(self, model: nn.Module, slots: int, capacity: int) -> Any: ...


class AttentionDecoding:
    """Incremental decoding of a transformer: `model(idx, positions, cache, mask)`, and
    `model.kv_spec()` for the caches' shape, dtype and device."""

    @staticmethod
    def prefill(model: nn.Module, prompts: list[list[int]], capacity: int) -> tuple[torch.Tensor, KVCache]:
        """Run the prompts (left-padded to a batch) into a fresh cache; return last logits (B, V)."""
        spec = model.kv_spec()
        B, T = len(prompts), max(len(p) for p in prompts)
        capacity = min(max(capacity, T), model.context_limit)
        dtype = torch.get_autocast_dtype(spec.device.type) if torch.is_autocast_enabled(spec.device.type) \
            else spec.dtype
        shape = (B, spec.heads, capacity, spec.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=spec.device) for _ in range(spec.layers)]
        values = [torch.zeros(shape, dtype=dtype, device=spec.device) for _ in range(spec.layers)]
        idx = torch.zeros((B, T), dtype=torch.long, device=spec.device)
        valid = torch.zeros((B, T), dtype=torch.bool, device=spec.device)
        for row, prompt in enumerate(prompts):
            idx[row, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            valid[row, T - len(prompt):] = True
        padded = not bool(valid.all())
        key_valid = None
        if padded:
            key_valid = torch.ones((B, capacity), dtype=torch.bool, device=spec.device)
            key_valid[:, :T] = valid
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache = KVCache(keys, values, key_valid, positions[:, -1] + 1)
        mask = cache.padding_mask(T) if padded else None
        logits = model(idx, positions, cache, mask)
        return logits[:, -1], cache

    @staticmethod
    def decode_step(model: nn.Module, tokens: torch.Tensor, cache: KVCache | RaggedKVCache) -> torch.Tensor:
        """Feed one new token per row (B,); return next-token logits (B, V)."""
        if isinstance(cache, RaggedKVCache):
            mask = cache.start_step()
            positions = cache.lengths[: cache.rows].unsqueeze(1)
            return model(tokens.unsqueeze(1), positions, cache, mask)[:, -1]
        positions = cache.next_position.unsqueeze(1)
        mask = cache.padding_mask(1) if cache.key_valid is not None else None
        logits = model(tokens.unsqueeze(1), positions, cache, mask)
        cache.next_position = cache.next_position + 1
        return logits[:, -1]

    @staticmethod
    def batch_cache(model: nn.Module, slots: int, capacity: int) -> RaggedKVCache:
        """An empty cache for up to `slots` sequences of up to `capacity` tokens each."""
        spec = model.kv_spec()
        shape = (slots, spec.heads, min(capacity, model.context_limit), spec.head_dim)

        def zeros() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.layers)]

        return RaggedKVCache(zeros(), zeros(), torch.zeros(slots, dtype=torch.long, device=spec.device))


class RecurrentDecoding:
    """Incremental decoding of a recurrent network: `model.read_prompts(prompts)` and
    `model.run(idx, hidden)`; the state has no size limit."""

    @staticmethod
    def prefill(model: nn.Module, prompts: list[list[int]], capacity: int) -> tuple[torch.Tensor, RecurrentState]:
        del capacity  # a recurrent state has no size limit
        logits, hidden = model.read_prompts(prompts)
        return logits, RecurrentState(hidden)

    @staticmethod
    def decode_step(model: nn.Module, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        logits, state.hidden = model.run(tokens.unsqueeze(1), state.hidden)
        return logits[:, -1]

    @staticmethod
    def batch_cache(model: nn.Module, slots: int, capacity: int) -> RecurrentState:
        """An empty state that sequences join and leave (a recurrent state needs no slots)."""
        del model, slots, capacity
        return RecurrentState(None)


DECODINGS: dict[str, Decoding] = {"attention": AttentionDecoding(), "recurrent": RecurrentDecoding()}


def decoding_for(model: nn.Module) -> Decoding:
    """How to decode `model` one token at a time, as its family's registry entry says."""
    kind = family_of(model.family).decoding
    if kind is None:
        raise TrustgenError(f"a {model.family} model does not generate token by token.")
    return DECODINGS[kind]
