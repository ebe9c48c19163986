"""Rows of different histories in one batch: states padded to one shape, and rows taken out and put back.

A decode whose rows keep their own positions holds every row's memory at the model's full memory length,
left-padded with slots marked invalid (a fresh document's memory is all invalid), and every recurrent state as a
tensor, so that rows can be replaced, stacked and selected whatever each one has seen.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..model.recurrent import StateView
from ..model.state import ModelState, XLMemory


def full_length_state(model, state: ModelState, batch_size: int) -> ModelState:
    """``state`` with every memory left-padded to max_memory_len (invalid slots) and every state a tensor: the
    same shapes for every row and every block, whatever each row's history (a fresh document's memory is all
    invalid, which its attention never sees)."""
    config = model.config
    length, width, device = config.max_memory_len, config.kv_dim, model.device
    memories = []
    for memory in state.memories:
        if memory is None:
            empty = torch.zeros(batch_size, 0, width, dtype=model.dtype, device=device)
            memory = XLMemory(empty, empty)
        valid = memory.valid
        if valid is None:
            valid = torch.ones(memory.keys.shape[:2], dtype=torch.bool, device=device)
        missing = length - memory.length
        if missing:
            pad = torch.zeros(batch_size, missing, width, dtype=memory.keys.dtype, device=device)
            memory = XLMemory(
                torch.cat((pad, memory.keys), dim=1), torch.cat((pad, memory.values), dim=1),
                torch.cat((valid.new_zeros(batch_size, missing), valid), dim=1),
            )
        else:
            memory = XLMemory(memory.keys, memory.values, valid)
        memories.append(memory)
    states = tuple(
        cell.initial_state.expand(batch_size, -1, -1).clone() if s is None else s
        for cell, s in zip(model.cells, state.states)
    )
    return ModelState(tuple(memories), states)


def set_rows(state: ModelState, rows: Tensor, part: ModelState) -> ModelState:
    """``state`` (full length) with ``rows`` replaced by ``part`` (full length), as new tensors."""
    memories = tuple(
        XLMemory(m.keys.index_copy(0, rows, p.keys), m.values.index_copy(0, rows, p.values),
                 m.valid.index_copy(0, rows, p.valid))
        for m, p in zip(state.memories, part.memories)
    )
    return ModelState(memories, tuple(s.index_copy(0, rows, p) for s, p in zip(state.states, part.states)))


def stack_rows(parts: Sequence[ModelState], order: Tensor) -> ModelState:
    """Full-length states of several groups of rows as one batch, row ``order[i]`` of the concatenation first."""
    cat = lambda tensors: torch.cat(tensors)[order]
    memories = tuple(
        XLMemory(cat([m.keys for m in ms]), cat([m.values for m in ms]), cat([m.valid for m in ms]))
        for ms in zip(*(p.memories for p in parts))
    )
    return ModelState(memories, tuple(cat(list(ss)) for ss in zip(*(p.states for p in parts))))


def view_rows(views: Sequence[StateView], rows: Tensor) -> tuple[StateView, ...]:
    return tuple(StateView(*(t[rows] for t in view)) for view in views)
