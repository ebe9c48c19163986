"""Explicit state carried between blocks and segments.

Nothing here is a module: the model reads a :class:`ModelState` and returns the next one. A state holds,
per layer, the Transformer-XL cache of raw (un-normalised, un-rotated) keys and values, and per recurrent
layer the state vectors. ``None`` stands for "nothing yet": an empty cache, or the learned initial state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .config import BlockRecurrentConfig


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


@dataclass(frozen=True)
class ModelState:
    """Everything a model carries from one block (or segment) to the next.

    memories: one :class:`XLMemory` (or None) per layer, bottom to top.
    states: one (B, S, dim) tensor (or None for the learned initial state) per recurrent layer,
    in the order of ``config.recurrent_layers``.
    """

    memories: tuple[XLMemory | None, ...]
    states: tuple[Tensor | None, ...]

    @classmethod
    def empty(cls, config: BlockRecurrentConfig) -> "ModelState":
        """The state of a fresh document: no memory, learned initial states."""
        return cls((None,) * config.depth, (None,) * len(config.recurrent_layers))

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

    # named tensors for checkpoints (None entries leave no tensor)

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Named tensors of this state. Every memory writes a validity mask (all True where it has none) and,
        per row, whether it had one (``valid_given``), so that the states of micro-batches and ranks have the
        same keys to concatenate and gather, and a resumed run gets back exactly the memories it saved."""
        tensors = {}
        for i, memory in enumerate(self.memories):
            if memory is not None:
                tensors[f"{prefix}.memory.{i}.keys"] = memory.keys
                tensors[f"{prefix}.memory.{i}.values"] = memory.values
                valid = memory.valid
                if valid is None:
                    valid = torch.ones(memory.keys.shape[:2], dtype=torch.bool, device=memory.keys.device)
                tensors[f"{prefix}.memory.{i}.valid"] = valid
                tensors[f"{prefix}.memory.{i}.valid_given"] = torch.full(
                    (memory.batch_size,), memory.valid is not None, dtype=torch.bool, device=memory.keys.device
                )
        for i, s in enumerate(self.states):
            if s is not None:
                tensors[f"{prefix}.state.{i}"] = s
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, depth: int, num_states: int) -> "ModelState":
        """The state :meth:`to_tensors` wrote (every memory with its validity mask)."""
        memories = []
        for i in range(depth):
            key = f"{prefix}.memory.{i}"
            if f"{key}.keys" in tensors:
                memories.append(XLMemory(tensors[f"{key}.keys"], tensors[f"{key}.values"], tensors.get(f"{key}.valid")))
            else:
                memories.append(None)
        states = tuple(tensors.get(f"{prefix}.state.{i}") for i in range(num_states))
        return cls(tuple(memories), states)


# checks of a state given by a caller, against the config and the batch


def _checked_memory(memory: Any, layer: int, batch_size: int, config: BlockRecurrentConfig) -> XLMemory | None:
    if memory is None:
        return None
    if not isinstance(memory, XLMemory):
        raise TypeError(f"xl_memories[{layer}] must be an XLMemory or None, got {type(memory).__name__}")
    if memory.keys.shape != memory.values.shape or memory.keys.ndim != 3:
        raise ValueError(f"xl_memories[{layer}]: keys and values must both be (batch, length, kv_heads * dim_head)")
    B, M, width = memory.keys.shape
    if B != batch_size:
        raise ValueError(f"xl_memories[{layer}] has batch size {B} but the input has {batch_size} rows")
    if width != config.kv_dim:
        raise ValueError(
            f"xl_memories[{layer}] has width {width}; this model's keys are kv_heads * dim_head = {config.kv_dim} wide"
        )
    if M > config.max_memory_len:
        raise ValueError(f"xl_memories[{layer}] holds {M} positions; at most {config.max_memory_len} allowed")
    if memory.valid is not None and memory.valid.shape != (B, M):
        raise ValueError(f"xl_memories[{layer}].valid must have shape ({B}, {M}), got {tuple(memory.valid.shape)}")
    return memory


def _checked_recurrent_state(state: Any, index: int, batch_size: int, config: BlockRecurrentConfig) -> Tensor | None:
    if state is None:
        return None
    if not isinstance(state, Tensor):
        raise TypeError(f"states[{index}] must be a tensor or None, got {type(state).__name__}")
    expected = (batch_size, config.num_state_vectors, config.dim)
    if tuple(state.shape) != expected:
        raise ValueError(
            f"states[{index}] must have shape (batch, num_state_vectors, dim) = {expected}, got {tuple(state.shape)}"
        )
    return state


def _checked_list(name: str, items: Any, expected: int, batch_size: int, config, check) -> tuple:
    if isinstance(items, Tensor) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list (one entry per {'layer' if name == 'xl_memories' else 'recurrent layer'})")
    if len(items) != expected:
        raise ValueError(f"{name} has {len(items)} entries; this model needs {expected} (or an empty list)")
    return tuple(check(item, i, batch_size, config) for i, item in enumerate(items))


def checked_state(config: BlockRecurrentConfig, state: ModelState | None, batch_size: int) -> ModelState:
    """``state`` checked against the config and the batch (None: a fresh document's empty state).

    Raises naming the entry that does not fit; reference-style (2, B, M, dh) memory tensors come back as
    :class:`XLMemory`.
    """
    if state is None:
        return ModelState.empty(config)
    if not isinstance(state, ModelState):
        raise TypeError(f"state must be a ModelState or None, got {type(state).__name__}")
    return ModelState(
        _checked_list("xl_memories", state.memories, config.depth, batch_size, config, _checked_memory),
        _checked_list("states", state.states, len(config.recurrent_layers), batch_size, config, _checked_recurrent_state),
    )
