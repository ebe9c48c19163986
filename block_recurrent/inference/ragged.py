"""Many prompts of different lengths decoded side by side, each exactly as if it were decoded alone.

Blocks sit at multiples of ``block_width`` from each document's start, so rows of different lengths stand at
different positions in their blocks: each row keeps its own position, and a row's block is committed (its
memory pushed, its states written) when that row's block fills, not another row's. Padding a short prompt
would move its blocks and change its answer; here nothing is padded that a row could see.

How rows of different histories share tensors: every row's memory is kept at the model's full memory length,
left-padded with slots marked invalid (a row at its first block has an all-invalid memory), exactly as a row
that starts a new document mid-batch is treated; invalid slots receive no attention, so a row computes what it
would compute alone. The per-token work (projections, attention, feed-forward) runs for all rows at once
through the model's own layer call, with one token per row at the row's position; commits run for the rows
whose blocks fill.

Prefill is batched as far as the rows allow: all rows start at a document start, so their first blocks are
aligned and run together, whole blocks at a time, for as long as rows have whole blocks; each row's last,
partial block runs with the rows whose tails have the same length.

Because every row's buffers keep one shape for the whole decode (memory at full length, block-sized key/value
buffers, the positions a tensor), the per-token pass has static shapes: :func:`compiled_token_pass` runs it
through ``torch.compile`` once per batch size, without recompiling per position or per block (commits run
eagerly, once per block). On the CPU that fuses the few hundred small operators of a token into a few dozen
kernels: 2-2.5x faster decoding at batch 1 (docs/generation.md), equal to the eager pass within rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..model.checks import check_tokens
from .decoding import PREFILL_SIDE_BY_SIDE_TOKENS
from ..model.layer import LayerCache
from ..model.recurrent import StateView
from ..model.state import ModelState, XLMemory


@dataclass(frozen=True)
class RaggedDecodeState:
    """Rows at their own positions. Owned by one decoding loop: its buffers are updated in place.

    committed: every row's state after its last complete block, memories left-padded to ``max_memory_len``.
    views, caches: the current blocks of all rows; ``caches[i].filled`` is a (B,) tensor of positions.
    """

    committed: ModelState
    views: tuple[StateView, ...]
    caches: tuple[LayerCache, ...]

    @property
    def positions(self) -> Tensor:
        return self.caches[0].filled


def check_prompts(prompts, num_tokens: int) -> list[Tensor]:
    """A non-empty list of 1-D token tensors of length >= 1 each, on one device."""
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of 1-D token tensors")
    checked = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, Tensor) or prompt.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D tensor of token ids, got {getattr(prompt, 'shape', prompt)!r}")
        check_tokens(prompt[None], num_tokens, f"prompts[{i}]")
        checked.append(prompt)
    if len({p.device for p in checked}) > 1:
        raise ValueError("prompts must all be on one device")
    return checked


# rows of states with different histories in one batch


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


def _set_rows(state: ModelState, rows: Tensor, part: ModelState) -> ModelState:
    """``state`` (padded) with ``rows`` replaced by ``part`` (padded), as new tensors."""
    memories = tuple(
        XLMemory(m.keys.index_copy(0, rows, p.keys), m.values.index_copy(0, rows, p.values),
                 m.valid.index_copy(0, rows, p.valid))
        for m, p in zip(state.memories, part.memories)
    )
    return ModelState(memories, tuple(s.index_copy(0, rows, p) for s, p in zip(state.states, part.states)))


def _open(model, committed: ModelState, batch_size: int) -> tuple[tuple[StateView, ...], tuple[LayerCache, ...]]:
    """Every row's block at position 0, in block-sized buffers (zeros where nothing is written yet, so that
    slots no row sees never hold a NaN that a zero attention weight would still propagate)."""
    views, caches = model.open_block(committed, batch_size, token_by_token=True)
    views = tuple(StateView(*(t.clone() for t in view)) for view in views)  # rows are rewritten in place
    W = model.config.block_width
    opened = []
    for cache in caches:
        M = cache.memory_len
        keys = cache.keys.new_zeros(*cache.keys.shape[:2], M + W, cache.keys.shape[-1])
        keys[:, :, :M] = cache.keys
        values = cache.values.new_zeros(batch_size, M + W, cache.values.shape[-1])
        values[:, :M] = cache.values
        positions = torch.zeros(batch_size, dtype=torch.long, device=keys.device)
        opened.append(cache._replace(keys=keys, values=values, raw_keys=values.new_zeros(batch_size, W, values.shape[-1]),
                                     filled=positions, written=[0]))
    return views, tuple(opened)


def _reopen_rows(model, rs: RaggedDecodeState, rows: Tensor, committed: ModelState) -> None:
    """Start the next block of ``rows`` (whose committed states are ``committed``) in rs's buffers, in place.
    The buffers keep their input projections (copied when the decode opened): no copies per block."""
    views, caches = model.open_block(committed, rows.shape[0])
    for view, new in zip(rs.views, views):
        for field, value in zip(view, new):
            field[rows] = value
    for cache, new in zip(rs.caches, caches):
        M = cache.memory_len
        cache.keys[rows, :, :M] = new.keys
        cache.values[rows, :M] = new.values
        cache.mask[rows] = new.mask
        if cache.empty is not None:
            cache.empty[rows] = new.empty
        for keys, new_keys in zip(cache.read_keys, new.read_keys):
            keys[rows] = new_keys
        cache.filled[rows] = 0


def _view_rows(views: tuple[StateView, ...], rows: Tensor) -> tuple[StateView, ...]:
    return tuple(StateView(*(t[rows] for t in view)) for view in views)


def _rows_of(rs: RaggedDecodeState, rows: Tensor) -> tuple[ModelState, tuple[StateView, ...], tuple[LayerCache, ...]]:
    """The committed state, views and full-block caches of ``rows``, as a batch of their own."""
    W = rs.caches[0].raw_keys.shape[1]
    views = _view_rows(rs.views, rows)
    caches = tuple(
        c._replace(keys=c.keys[rows], values=c.values[rows], raw_keys=c.raw_keys[rows], filled=W) for c in rs.caches
    )
    return rs.committed.select_rows(rows), views, caches


def ragged_prefill(
    model, prompts: Sequence[Tensor], state: ModelState | None = None
) -> tuple[Tensor, RaggedDecodeState]:
    """Consume prompts of different lengths; return the logits (B, V) after each prompt's last token and the
    ragged decode state. ``state``: a checked model state every row continues from (its blocks start there, as
    with :func:`~block_recurrent.inference.decoding.prefill`); None: fresh documents. Runs in the model's current mode and
    grad setting (generation wraps it in eval and no_grad)."""
    config = model.config
    W = config.block_width
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(B, int(lengths.max()), dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    committed = full_length_state(model, ModelState.empty(config) if state is None else state, B)
    last: list[Tensor | None] = [None] * B  # each row's hidden state after its last prompt token

    # 1. whole blocks, batched over the rows that still have one (their blocks are aligned); runs of blocks that
    # every such row has go side by side where the config allows (as prefill does)
    block = 0
    while True:
        left = lengths // W - block  # whole blocks each row has still to run
        rows = (left > 0).nonzero()[:, 0]
        if rows.numel() == 0:
            break
        n = min(int(left[rows].min()), max(1, PREFILL_SIDE_BY_SIDE_TOKENS // W)) if model.blocks_side_by_side else 1
        device_rows = rows.to(tokens.device)
        x = model.embed(tokens[device_rows, block * W : (block + n) * W])
        run = model.forward_blocks if n > 1 else model.forward_block
        hidden, after = run(x, committed.select_rows(device_rows))
        committed = _set_rows(committed, device_rows, full_length_state(model, after, len(rows)))
        for i, row in enumerate(rows.tolist()):
            if lengths[row] == (block + n) * W:
                last[row] = hidden[i, -1]
        block += n

    # 2. every row's current block, then each row's tail (its last, partial block), rows of equal tails together
    views, caches = _open(model, committed, B)
    rs = RaggedDecodeState(committed, views, caches)
    tails = lengths % W
    for tail in sorted(set(tails.tolist()) - {0}):
        rows = (tails == tail).nonzero()[:, 0]
        device_rows = rows.to(tokens.device)
        starts = lengths[rows] - tail
        x = model.embed(torch.stack([tokens[r, s : s + tail] for r, s in zip(rows.tolist(), starts.tolist())]))
        sub_views = _view_rows(views, device_rows)
        sub_caches = tuple(
            c._replace(keys=c.keys[device_rows, :, : c.memory_len], values=c.values[device_rows, : c.memory_len],
                       raw_keys=None, filled=0, written=[0], mask=c.mask[device_rows],
                       empty=None if c.empty is None else c.empty[device_rows],
                       read_keys=tuple(k[device_rows] for k in c.read_keys))
            for c in caches
        )
        hidden, sub_caches = model.forward_tokens(x, sub_caches, sub_views)
        for cache, sub in zip(caches, sub_caches):
            M = cache.memory_len
            cache.keys[device_rows, :, M : M + tail] = sub.keys[:, :, M : M + tail]
            cache.values[device_rows, M : M + tail] = sub.values[:, M : M + tail]
            cache.raw_keys[device_rows, :tail] = sub.raw_keys[:, :tail]
            cache.filled[device_rows] = tail
        for i, row in enumerate(rows.tolist()):
            last[row] = hidden[i, -1]
    return model.logits(torch.stack(last)), rs


def token_pass(model, tokens: Tensor, caches: tuple[LayerCache, ...], views: tuple[StateView, ...]):
    """One token (B,) per row through every layer at the rows' positions: (next-token logits (B, V), the caches
    with the token written). Commits nothing."""
    hidden, caches = model.forward_tokens(model.embed(tokens[:, None]), caches, views)
    return model.logits(hidden[:, -1]), caches


_compiled_token_pass = None


def compiled_token_pass():
    """:func:`token_pass` under ``torch.compile`` with static shapes, built on first use.

    One compiled graph per model configuration, batch size, dtype and grad/autocast mode, which dynamo guards on
    (another model of the same configuration reuses the graph). The first call of each compiles: tens of seconds
    on a small CPU, a few when inductor's on-disk cache has it. Positions are data, so no position or block
    recompiles it. Past torch's limit of compiled variants of one function
    (``torch._dynamo.config.cache_size_limit``, 8) dynamo runs the pass eagerly, with a warning.
    """
    global _compiled_token_pass
    if _compiled_token_pass is None:
        # C++ wrapper code calls the kernels without Python in between: 14-17% faster per token at batch 1
        _compiled_token_pass = torch.compile(token_pass, dynamic=False, options={"cpp_wrapper": True})
    return _compiled_token_pass


def ragged_step(
    model, tokens: Tensor, rs: RaggedDecodeState, *, compiled: bool = False
) -> tuple[Tensor, RaggedDecodeState]:
    """Feed one token (B,) per row at each row's own position: the next-token logits (B, V) and the state.
    Rows whose block fills commit it (memory pushed, states written) and start their next block.
    ``compiled``: run the per-token pass through :func:`compiled_token_pass` (equal to the eager pass within
    rounding, not bit for bit)."""
    logits, caches = (compiled_token_pass() if compiled else token_pass)(model, tokens, rs.caches, rs.views)
    rs = RaggedDecodeState(rs.committed, rs.views, caches)
    full = (caches[0].filled == model.config.block_width).nonzero()[:, 0]
    if full.numel():
        committed, views, block_caches = _rows_of(rs, full)
        done = model.commit_block(committed, views, model.block_keys(block_caches))  # exactly as forward_block commits
        done = full_length_state(model, done, full.shape[0])
        rs = RaggedDecodeState(_set_rows(rs.committed, full, done), rs.views, caches)
        _reopen_rows(model, rs, full, done)
    return logits, rs
