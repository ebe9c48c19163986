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
        """Named tensors of this state, rows first. Every memory writes a validity mask (all True where it has
        none) and, per row, whether it had one (``valid_given``), so that the states of micro-batches and ranks
        have the same keys to concatenate and gather, and a resumed run gets back exactly the memories it saved."""
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
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, depth: int, num_states: int,
                     rows: Tensor | None = None) -> "ModelState":
        """The state :meth:`to_tensors` wrote, or only its batch rows ``rows`` (an index tensor). A memory none
        of whose rows had a validity mask (``valid_given``) comes back without one: the same computation path."""
        def pick(tensor: Tensor) -> Tensor:
            return tensor if rows is None else tensor[rows]

        memories = []
        for i in range(depth):
            key = f"{prefix}.memory.{i}"
            if f"{key}.keys" not in tensors:
                memories.append(None)
                continue
            valid = tensors.get(f"{key}.valid")
            given = tensors.get(f"{key}.valid_given")
            if valid is not None and given is not None and not bool(pick(given).any()):
                valid = None
            memories.append(XLMemory(pick(tensors[f"{key}.keys"]), pick(tensors[f"{key}.values"]),
                                     None if valid is None else pick(valid)))
        states = tuple(tensors.get(f"{prefix}.state.{i}") for i in range(num_states))
        return cls(tuple(memories), tuple(None if s is None else pick(s) for s in states))


# the checkpoint format of what a trainer carries from one step to the next, for a batch of rows: the state
# (``carry.*``) and, when the state's write is replayed, the states each recurrent layer's last write started from
# (``written_from.{i}``). Every batch writes the same keys, so the carries of micro-batches and ranks concatenate
# and gather along the rows

CARRY = "carry"
WRITTEN_FROM = "written_from"


def carry_to_tensors(state: ModelState, written_from: Sequence[Tensor | None] | None,
                     initial_states: Sequence[Tensor]) -> dict[str, Tensor]:
    """Named tensors (rows first) of one batch's carried ``state`` and ``written_from`` (None: not replayed).

    A write that started from the learned initial state (None) is spelled out as that state, so that every batch
    has the same tensors, and flagged in ``written_from.{i}.initial``, so that the resumed replay starts from the
    parameter again rather than from a copy of it."""
    tensors = state.to_tensors(CARRY)
    if written_from is not None:
        B = state.batch_size
        for i, (start, initial) in enumerate(zip(written_from, initial_states)):
            device = initial.device if start is None else start.device
            tensors[f"{WRITTEN_FROM}.{i}"] = initial.detach()[None].expand(B, -1, -1) if start is None else start
            tensors[f"{WRITTEN_FROM}.{i}.initial"] = torch.full((B,), start is None, device=device)
    return tensors


def carry_from_tensors(tensors: dict[str, Tensor], config: BlockRecurrentConfig, rows: Tensor, total_rows: int
                       ) -> tuple[ModelState | None, tuple[Tensor | None, ...] | None]:
    """The carry of batch rows ``rows`` (an index tensor) from what :func:`carry_to_tensors` wrote for all
    ``total_rows`` rows: (state, written_from), each None when the tensors hold none. A ValueError names a
    tensor whose rows are not ``total_rows``."""
    carried = {k: v for k, v in tensors.items() if k.startswith(f"{CARRY}.") or k.startswith(f"{WRITTEN_FROM}.")}
    for name, tensor in carried.items():
        if tensor.ndim == 0 or tensor.shape[0] != total_rows:
            raise ValueError(f"carried tensor {name} has shape {tuple(tensor.shape)}; expected {total_rows} rows")
    num_states = len(config.recurrent_layers)
    state = None
    if any(k.startswith(f"{CARRY}.") for k in carried):
        state = ModelState.from_tensors(carried, CARRY, config.depth, num_states, rows)
    if f"{WRITTEN_FROM}.0" not in carried:  # (none in a run saved without the replay)
        return state, None
    written_from = []
    for i in range(num_states):
        start, initial = carried.get(f"{WRITTEN_FROM}.{i}"), carried.get(f"{WRITTEN_FROM}.{i}.initial")
        if start is None or initial is None:
            raise ValueError(f"carried tensors {WRITTEN_FROM}.{i} and {WRITTEN_FROM}.{i}.initial are missing")
        written_from.append(None if bool(initial[rows].all()) else start[rows])
    return state, tuple(written_from)


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
