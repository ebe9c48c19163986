"""Checks of user input at the public entry points: clear ValueError/TypeError, never a bare assert."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .state import ModelState, XLMemory

if TYPE_CHECKING:
    from .model import BlockRecurrentTransformer


def check_tokens(tokens: Any, num_tokens: int, name: str = "x") -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one token, got shape {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= num_tokens:
        raise ValueError(f"{name} holds token ids in [{low}, {high}]; allowed range is [0, {num_tokens - 1}]")


def check_labels(labels: Any, shape: torch.Size, num_tokens: int, ignore_index: int) -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer torch.Tensor")
    if labels.shape != shape:
        raise ValueError(f"labels must have the shape of x {tuple(shape)}, got {tuple(labels.shape)}")
    real = labels[labels != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_tokens):
        raise ValueError(
            f"labels must be in [0, {num_tokens - 1}] or ignore_index={ignore_index}, "
            f"got values in [{int(real.min())}, {int(real.max())}]"
        )


def check_reset(reset: Any, batch_size: int) -> None:
    if not isinstance(reset, Tensor) or reset.dtype != torch.bool:
        raise TypeError("reset must be a bool tensor of shape (batch,), True where a row starts a new document")
    if reset.shape != (batch_size,):
        raise ValueError(f"reset must have shape ({batch_size},), got {tuple(reset.shape)}")


def _check_memory(memory: Any, layer: int, batch_size: int, model: "BlockRecurrentTransformer") -> XLMemory | None:
    config = model.config
    if memory is None:
        return None
    if isinstance(memory, Tensor):
        if memory.ndim != 4 or memory.shape[0] != 2:
            raise ValueError(
                f"xl_memories[{layer}] must be an XLMemory or a (2, batch, length, dim_head) tensor, "
                f"got shape {tuple(memory.shape)}"
            )
        memory = XLMemory.from_reference(memory)
    if not isinstance(memory, XLMemory):
        raise TypeError(f"xl_memories[{layer}] must be an XLMemory, a tensor or None, got {type(memory).__name__}")
    if memory.keys.shape != memory.values.shape or memory.keys.ndim != 3:
        raise ValueError(f"xl_memories[{layer}]: keys and values must both be (batch, length, kv_heads * dim_head)")
    B, M, dh = memory.keys.shape
    if B != batch_size:
        raise ValueError(f"xl_memories[{layer}] has batch size {B} but the input has {batch_size} rows")
    if dh != config.kv_dim:
        raise ValueError(
            f"xl_memories[{layer}] has width {dh}; this model's keys are kv_heads * dim_head = {config.kv_dim} wide"
        )
    if M > config.max_memory_len:
        raise ValueError(f"xl_memories[{layer}] holds {M} positions; at most {config.max_memory_len} allowed")
    if memory.valid is not None and memory.valid.shape != (B, M):
        raise ValueError(f"xl_memories[{layer}].valid must have shape ({B}, {M}), got {tuple(memory.valid.shape)}")
    return memory


def _check_state(state: Any, index: int, batch_size: int, model: "BlockRecurrentTransformer") -> Tensor | None:
    config = model.config
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


def normalise_state(
    model: "BlockRecurrentTransformer", state: ModelState | None, batch_size: int
) -> ModelState:
    """Check a ModelState against the model and the batch; None means a fresh start."""
    if state is None:
        return model.empty_state()
    if not isinstance(state, ModelState):
        raise TypeError(f"state must be a ModelState or None, got {type(state).__name__}")
    return ModelState(
        _check_list("xl_memories", state.memories, model.config.depth, batch_size, model, _check_memory),
        _check_list("states", state.states, len(model.config.recurrent_layers), batch_size, model, _check_state),
    )


def _check_list(name: str, items: Any, expected: int, batch_size: int, model, check) -> tuple:
    if isinstance(items, Tensor) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list (one entry per {'layer' if name == 'xl_memories' else 'recurrent layer'})")
    if len(items) != expected:
        raise ValueError(f"{name} has {len(items)} entries; this model needs {expected} (or an empty list)")
    return tuple(check(item, i, batch_size, model) for i, item in enumerate(items))


def state_from_lists(
    model: "BlockRecurrentTransformer",
    xl_memories: Sequence | None,
    states: Sequence | None,
    batch_size: int,
) -> ModelState:
    """The reference's (xl_memories, states) lists as a checked ModelState; empty or None means fresh."""
    def fill(items, count):
        if items is None:
            return (None,) * count
        if isinstance(items, Tensor) or not isinstance(items, Sequence):
            return items  # rejected with a clear message below
        return tuple(items) if len(items) else (None,) * count

    state = ModelState(
        fill(xl_memories, model.config.depth), fill(states, len(model.config.recurrent_layers))
    )
    return normalise_state(model, state, batch_size)


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """An int (not a bool) >= minimum (and <= maximum when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_float(name: str, value: Any, low: float, high: float | None = None, *, open_high: bool = False) -> None:
    """A real number in [low, high] ([low, high) with ``open_high``; no upper bound when high is None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    too_high = high is not None and (value >= high if open_high else value > high)
    if not value >= low or too_high:  # `not >=` also rejects NaN
        bound = "" if high is None else (f", < {high}" if open_high else f", <= {high}")
        raise ValueError(f"{name} must be a number >= {low}{bound}, got {value}")
