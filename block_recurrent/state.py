"""Explicit state carried between blocks and segments.

Nothing here is a module: the model reads a :class:`ModelState` and returns the next one. A state holds,
per layer, the Transformer-XL cache of raw (un-normalised, un-rotated) keys and values, and per recurrent
layer the state vectors. ``None`` stands for "nothing yet": an empty cache, or the learned initial state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class XLMemory:
    """Cached keys and values of one layer, as the layer projected them (before normalisation and rotation).

    keys, values: (B, M, kv_heads * dim_head), the key/value heads side by side (one head by default). valid: (B, M) bool, or None when every position is valid; positions
    turn invalid when their row starts a new document (see :meth:`ModelState.reset_rows`).
    """

    keys: Tensor
    values: Tensor
    valid: Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def detach(self) -> "XLMemory":
        return XLMemory(self.keys.detach(), self.values.detach(), self.valid)

    def to(self, *args, **kwargs) -> "XLMemory":
        keys = self.keys.to(*args, **kwargs)
        valid = None if self.valid is None else self.valid.to(keys.device)
        return XLMemory(keys, self.values.to(*args, **kwargs), valid)

    def select_rows(self, rows: Tensor) -> "XLMemory":
        valid = None if self.valid is None else self.valid[rows]
        return XLMemory(self.keys[rows], self.values[rows], valid)

    def as_reference(self) -> Tensor:
        """The reference port's layout: a (2, B, M, dim_head) tensor of stacked keys and values."""
        return torch.stack((self.keys, self.values))

    @classmethod
    def from_reference(cls, memory: Tensor) -> "XLMemory":
        if memory.ndim != 4 or memory.shape[0] != 2:
            raise ValueError(f"a reference-style memory must have shape (2, B, M, dim_head), got {tuple(memory.shape)}")
        return cls(memory[0], memory[1])


@dataclass(frozen=True)
class ModelState:
    """Everything a model carries from one block (or segment) to the next.

    memories: one :class:`XLMemory` (or None) per layer, bottom to top.
    states: one (B, S, dim) tensor (or None for the learned initial state) per recurrent layer,
    in the order of ``config.recurrent_layers``.
    """

    memories: tuple[XLMemory | None, ...]
    states: tuple[Tensor | None, ...]

    @property
    def batch_size(self) -> int | None:
        for memory in self.memories:
            if memory is not None:
                return memory.batch_size
        for state in self.states:
            if state is not None:
                return state.shape[0]
        return None

    def detach(self) -> "ModelState":
        return ModelState(
            tuple(None if m is None else m.detach() for m in self.memories),
            tuple(None if s is None else s.detach() for s in self.states),
        )

    def to(self, *args, **kwargs) -> "ModelState":
        return ModelState(
            tuple(None if m is None else m.to(*args, **kwargs) for m in self.memories),
            tuple(None if s is None else s.to(*args, **kwargs) for s in self.states),
        )

    def select_rows(self, rows: Tensor) -> "ModelState":
        """The state of a subset of batch rows (an index or boolean tensor over the batch)."""
        return ModelState(
            tuple(None if m is None else m.select_rows(rows) for m in self.memories),
            tuple(None if s is None else s[rows] for s in self.states),
        )

    def reset_rows(self, reset: Tensor, initial_states: tuple[Tensor, ...]) -> "ModelState":
        """Rows where ``reset`` (B,) is True start a new document: empty memory, learned initial state.

        The other rows are untouched. ``initial_states`` are the model's learned (S, dim) initial states.
        """
        reset = reset.to(torch.bool)
        keep = ~reset
        memories = []
        for memory in self.memories:
            if memory is None:
                memories.append(None)
                continue
            valid = keep[:, None].expand(-1, memory.length)
            if memory.valid is not None:
                valid = valid & memory.valid
            memories.append(XLMemory(memory.keys, memory.values, valid))
        states = []
        for state, initial in zip(self.states, initial_states):
            if state is None:
                states.append(None)
                continue
            states.append(torch.where(reset[:, None, None], initial.to(state.dtype), state))
        return ModelState(tuple(memories), tuple(states))
