"""Exact cached decoding: prefill prompts of any length, then feed one token per row at a time.

A :class:`DecodeState` is where decoding stands, explicit and returned anew by every call:

    committed ModelState (XL memories and recurrent states after each row's last complete block)
    + the recurrent states' views for the current block (computed once, when the block opens)
    + per layer, the block's cache (memory keys prepared once, the block's keys/values so far)

Blocks sit at multiples of ``block_width`` from where each row's state starts (the document start for a fresh
state), exactly as ``model.run`` cuts a whole text, and a filled block is committed by ``model.commit_block``,
the commit ``forward_block`` makes, so teacher-forced decoding reproduces ``model.run``'s logits everywhere.

Rows either share one position in their block (a (B, T) prompt: the rectangular case) or each keep their own
(prompts of different lengths, or compiled decoding). Then every row's memory is kept at the model's full
memory length, left-padded with slots marked invalid, exactly as a row that starts a new document mid-batch,
and the caches are block-sized buffers: the shapes never change, so the per-token pass compiles once
(:func:`compiled_token_pass`), and a row's block is committed when that row's block fills. Nothing is padded
that a row could see, so every row computes what it would compute alone.

Decode states never change in a way their holder sees: feeding writes the block's buffers in place only when
no newer state has written into them, and copies them first otherwise, so two continuations of one decode
state are both exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..model.layer import (
    LayerCache, block_keys, copy_buffers, per_row, place_block, position, reopen_rows, select_rows,
)
from ..model.recurrent import StateView
from ..model.state import ModelState, checked_state
from ..model.checks import check_tokens
from .inputs import as_batch, check_decode_state, check_model, check_prompts
from .rows import full_length_state, set_rows, stack_rows, view_rows


# prefill runs a prompt's whole blocks side by side in pieces of at most this many tokens (bounding its memory)
PREFILL_SIDE_BY_SIDE_TOKENS = 1024


@dataclass(frozen=True)
class DecodeState:
    """Where incremental decoding stands; returned anew by every call, never changed in a way its holder sees.

    committed: the model state after each row's last complete block (with rows at their own positions, every
        memory at full length, left-padded with invalid slots).
    views: per recurrent layer, the :class:`StateView` of ``committed.states`` used by this block's reads and by
        its commit.
    caches: per layer, the current block's cache (private to :mod:`block_recurrent.model.layer`).
    batch_size: rows decoded side by side.
    """

    committed: ModelState
    views: tuple[StateView, ...]
    caches: tuple[LayerCache, ...]
    batch_size: int
    # states fed from one another share the caches' buffers: ``newest`` (shared) holds the generation of the
    # newest of them, and a state that is not the newest copies the buffers before feeding
    generation: int = 0
    newest: list = field(default_factory=lambda: [0], repr=False, compare=False)

    @property
    def positions(self) -> int | Tensor:
        """Tokens of the current block already fed, in [0, block_width): an int when the rows share it, else a
        (B,) tensor of each row's."""
        return position(self.caches[0])

    @property
    def per_row(self) -> bool:
        """Whether each row keeps its own position (block-sized buffers, full-length memories)."""
        return isinstance(self.positions, Tensor)

    @property
    def position(self) -> int:
        """The rows' shared position in the current block."""
        if self.per_row:
            raise ValueError("the rows of this decode state stand at their own positions: use .positions")
        return self.positions

    def select_rows(self, rows: Tensor) -> "DecodeState":
        """The decode state of batch rows ``rows`` (an index tensor over the batch; rows may repeat or move, as
        beam search reorders its beams), on tensors of its own."""
        if not isinstance(rows, Tensor) or rows.ndim != 1 or rows.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"rows must be a 1-D integer tensor of batch rows, got {getattr(rows, 'shape', rows)!r}")
        if rows.numel() and not bool(((rows >= 0) & (rows < self.batch_size)).all()):
            raise ValueError(f"rows must be in [0, {self.batch_size - 1}], got {rows.tolist()}")
        committed = ModelState(
            tuple(None if m is None else m.select_rows(rows) for m in self.committed.memories),
            tuple(None if s is None or s.shape[0] != self.batch_size else s[rows] for s in self.committed.states),
        )
        views = tuple(StateView(*(t[rows] for t in view)) for view in self.views)
        return DecodeState(committed, views, tuple(select_rows(c, rows) for c in self.caches), rows.shape[0])

    @property
    def partial(self) -> tuple[tuple[Tensor, Tensor], ...] | None:
        """Per layer, the raw (keys, values) (B, position, kv_dim) of the block so far; None at a block start."""
        if self.position == 0:
            return None
        return tuple(block_keys(cache) for cache in self.caches)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (no dropout); restore the caller's mode afterwards."""
    was_training = model.training
    if was_training:  # switching walks every module: skip it when already in eval mode
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@contextlib.contextmanager
def eval_no_grad(model: nn.Module, inference: bool = False):
    """Run in eval mode (no dropout) without autograd; restore the caller's mode afterwards. ``inference``: under
    ``torch.inference_mode``, which skips autograd's bookkeeping on every operator; for callers whose tensors
    never leave the context (a decode state would, and its buffers could then not be written outside it)."""
    with eval_mode(model), torch.inference_mode() if inference else torch.no_grad():
        yield


# opening, feeding and committing blocks


def _opened(model, committed: ModelState, batch_size: int) -> DecodeState:
    """A decode state at the start of the block after ``committed``, the rows sharing position 0."""
    views, caches = model.open_block(committed, batch_size, token_by_token=True)
    return DecodeState(committed, views, caches, batch_size)


def start(model, state: ModelState | None, batch_size: int) -> DecodeState:
    """A decode state at a block boundary, from a committed model state (None: a fresh document)."""
    return _opened(model, checked_state(model.config, state, batch_size), batch_size)


def _rows_apart(model, parts: Sequence[tuple[Tensor, DecodeState]], batch_size: int) -> DecodeState:
    """One decode state whose rows keep their own positions, from decode states of groups of rows that each
    share a position: ``parts`` holds (the group's rows in the batch, its decode state)."""
    order = torch.cat([rows for rows, _ in parts]).argsort()  # batch row -> its place in the concatenation
    committed = stack_rows(
        [full_length_state(model, ds.committed, ds.batch_size) for _, ds in parts], order.to(model.device)
    )
    views, caches = model.open_block(committed, batch_size, token_by_token=True)  # the views of each row's block
    # contiguous, as the views that replace some rows' at their block ends are: one layout, one compiled graph
    views = tuple(StateView(*(t.contiguous() for t in view)) for view in views)
    caches = tuple(per_row(cache, model.config.block_width) for cache in caches)
    for rows, ds in parts:
        if ds.position:
            rows = rows.to(model.device)
            caches = tuple(place_block(cache, rows, source) for cache, source in zip(caches, ds.caches))
    return DecodeState(committed, views, caches, batch_size)


def rows_apart(model, ds: DecodeState) -> DecodeState:
    """``ds`` with each row keeping its own position (the same decode; block-sized buffers, full-length
    memories), as compiled decoding needs."""
    if ds.per_row:
        return ds
    return _rows_apart(model, [(torch.arange(ds.batch_size), ds)], ds.batch_size)


def _commit_full_blocks(model, ds: DecodeState, caches: tuple[LayerCache, ...], newest: list) -> DecodeState:
    """The decode state after a call that left ``caches``: rows whose block filled commit it (memory pushed,
    states written, exactly as ``forward_block`` commits) and open their next block."""
    W, generation = model.config.block_width, ds.generation + 1
    newest[0] = generation
    P = position(caches[0])
    if not isinstance(P, Tensor):
        if P < W:
            return dataclasses.replace(ds, caches=caches, generation=generation, newest=newest)
        committed = model.commit_block(ds.committed, ds.views, tuple(block_keys(cache) for cache in caches))
        return _opened(model, committed, ds.batch_size)
    full = (P == W).nonzero()[:, 0]
    if full.numel() == 0:
        return dataclasses.replace(ds, caches=caches, generation=generation, newest=newest)
    done = model.commit_block(
        ds.committed.select_rows(full), view_rows(ds.views, full), tuple(block_keys(c, full, W) for c in caches)
    )
    done = full_length_state(model, done, full.shape[0])
    views, opened = model.open_block(done, full.shape[0], token_by_token=True)
    views = tuple(StateView(*(t.index_copy(0, full, new) for t, new in zip(view, fresh)))
                  for view, fresh in zip(ds.views, views))
    caches = tuple(reopen_rows(cache, full, new) for cache, new in zip(caches, opened))
    return DecodeState(set_rows(ds.committed, full, done), views, caches, ds.batch_size, generation, newest)


def _fed(model, ds: DecodeState, tokens: Tensor, token_pass: Callable) -> tuple[Tensor, DecodeState]:
    """Run ``token_pass(model, tokens, caches, views)`` on ``ds``'s block, on copies of its buffers if a newer
    state has written into them, and commit the blocks that fill: (the pass's output, the next decode state)."""
    caches, newest = ds.caches, ds.newest
    if newest[0] != ds.generation:
        caches, newest = tuple(copy_buffers(cache) for cache in caches), [ds.generation]
    out, caches = token_pass(model, tokens, caches, ds.views)
    return out, _commit_full_blocks(model, ds, caches, newest)


def _hidden_pass(model, tokens: Tensor, caches: tuple[LayerCache, ...], views: tuple[StateView, ...]):
    """Tokens (B, N) through every layer: (hidden (B, N, D), the caches with the tokens written)."""
    return model.forward_tokens(model.embed(tokens), caches, views)


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
    on a small CPU, a few when inductor's on-disk cache has it. On rows that keep their own positions, positions
    are data, so no position or block recompiles it. Past torch's limit of compiled variants of one function
    (``torch._dynamo.config.cache_size_limit``, 8) dynamo runs the pass eagerly, with a warning.
    """
    global _compiled_token_pass
    if _compiled_token_pass is None:
        # C++ wrapper code calls the kernels without Python in between: fewer microseconds per token at batch 1
        _compiled_token_pass = torch.compile(token_pass, dynamic=False, options={"cpp_wrapper": True})
    return _compiled_token_pass


def step(model, token: Tensor, ds: DecodeState, *, compiled: bool = False) -> tuple[Tensor, DecodeState]:
    """Feed one token (B,) per row, unchecked: (next-token logits (B, V), the next decode state). ``compiled``:
    through :func:`compiled_token_pass`, on rows that keep their own positions (equal to the eager pass within
    rounding, not bit for bit)."""
    if compiled:
        return _fed(model, rows_apart(model, ds), token, compiled_token_pass())
    return _fed(model, ds, token, token_pass)


def commit_partial(model, decode_state: DecodeState) -> ModelState:
    """The model state with the partly filled blocks committed, as ``model.run`` commits a call's last block.

    Continuing from it starts a new block, so it equals running the text seen so far in one ``run`` call,
    not the whole document: use the DecodeState itself to continue exactly.
    """
    ds = decode_state
    if not ds.per_row:
        if ds.position == 0:
            return ds.committed
        return model.commit_block(ds.committed, ds.views, tuple(block_keys(cache) for cache in ds.caches))
    committed = ds.committed
    for fed in sorted(set(ds.positions.tolist()) - {0}):
        rows = (ds.positions == fed).nonzero()[:, 0]
        done = model.commit_block(
            ds.committed.select_rows(rows), view_rows(ds.views, rows),
            tuple(block_keys(cache, rows, fed) for cache in ds.caches),
        )
        committed = set_rows(committed, rows, full_length_state(model, done, rows.shape[0]))
    return committed


# a decode state as plain tensors and back (to save it)


def decode_state_parts(ds: DecodeState) -> tuple[ModelState, Tensor, tuple[tuple[Tensor, Tensor], ...]]:
    """What a decode state is made of: (the committed state, each row's position (B,), per layer the raw keys
    and values of the rows' blocks so far, (B, longest position, kv_dim) each, row b's first positions[b] valid).
    The rest (views, prepared keys, masks) follows from these: :func:`decode_state_from_parts`."""
    if not ds.per_row:
        P = ds.position
        positions = torch.full((ds.batch_size,), P, dtype=torch.long)
        blocks = tuple(block_keys(cache) for cache in ds.caches) if P else ()
        return ds.committed, positions, blocks
    positions = ds.positions.cpu()
    longest = int(positions.max())
    rows = torch.arange(ds.batch_size, device=ds.positions.device)
    blocks = tuple(block_keys(cache, rows, longest) for cache in ds.caches) if longest else ()
    return ds.committed, positions, blocks


def decode_state_from_parts(
    model, committed: ModelState, positions: Tensor, blocks: Sequence[tuple[Tensor, Tensor]], per_row: bool,
) -> DecodeState:
    """The decode state :func:`decode_state_parts` took apart (``per_row``: whether its rows kept their own
    positions), its blocks refilled from their raw keys and values."""
    B = positions.shape[0]
    committed = checked_state(model.config, committed, B)

    def refilled(state: ModelState, rows: Tensor, P: int) -> DecodeState:
        ds = _opened(model, state, rows.shape[0])
        if not P:
            return ds
        caches = tuple(
            layer.attn.refill(cache, keys[rows, :P], values[rows, :P], model.rotary)
            for layer, cache, (keys, values) in zip(model.layers, ds.caches, blocks)
        )
        return dataclasses.replace(ds, caches=caches)

    if not per_row:
        return refilled(committed, torch.arange(B, device=model.device), int(positions[0]))
    parts = []
    for P in sorted(set(positions.tolist())):
        rows = (positions == P).nonzero()[:, 0]
        parts.append((rows, refilled(committed.select_rows(rows.to(model.device)), rows.to(model.device), P)))
    return _rows_apart(model, parts, B)


# checks and prefill


def as_decode_state(model, state: ModelState | DecodeState | None, batch_size: int) -> DecodeState:
    """A checked DecodeState to continue from: given, or opened from a ModelState (None: a fresh document)."""
    if isinstance(state, DecodeState):
        check_decode_state(model, state, batch_size)
        return state
    if state is not None and not isinstance(state, ModelState):
        raise TypeError(f"state must be a ModelState, a DecodeState or None, got {type(state).__name__}")
    return start(model, state, batch_size)


def _prefill_together(model, tokens: Tensor, ds: DecodeState) -> tuple[Tensor, DecodeState]:
    """Feed tokens (B, T) to rows that share a position: (hidden (B, D) after the last token, decode state).

    Work goes in pieces that end on block boundaries (the first only completes a block ``ds`` left half full);
    runs of whole blocks go side by side (``model.forward_blocks``, up to PREFILL_SIDE_BY_SIDE_TOKENS at a time)
    where the config allows, so memory stays that of one such piece whatever T is.
    """
    B, T = tokens.shape
    W = model.config.block_width
    hidden, begin = None, 0
    while begin < T:
        whole = min(T - begin, PREFILL_SIDE_BY_SIDE_TOKENS) // W * W
        if ds.position == 0 and model.blocks_side_by_side and whole >= 2 * W:
            hidden, committed = model.forward_blocks(model.embed(tokens[:, begin : begin + whole]), ds.committed)
            ds, begin = _opened(model, committed, B), begin + whole
            continue
        end = min(T, begin + W - ds.position)
        hidden, ds = _fed(model, ds, tokens[:, begin:end], _hidden_pass)
        begin = end
    return hidden[:, -1], ds


def prefill(
    model, prompt: Tensor | Sequence[Tensor], state: ModelState | DecodeState | None = None, *, rows_own: bool = False,
) -> tuple[Tensor, DecodeState]:
    """Consume a prompt; return the logits (B, V) after its last token and the decode state.

    prompt: (B, T) token ids, or (T,) for one row, of any length; or a list of 1-D prompts of different lengths,
        each decoded exactly as if alone (its rows then keep their own positions).
    state: where the prompt continues from (None: a fresh document; a ModelState starts a new block; a
        DecodeState continues its block). A list of prompts continues a ModelState or None.
    rows_own: return a decode state whose rows keep their own positions (as compiled decoding needs).

    Runs the model in its current mode and grad setting: :func:`~block_recurrent.inference.generation.generate`
    wraps it in eval + no_grad.
    """
    check_model(model)
    if isinstance(prompt, (list, tuple)):
        prompts = check_prompts(list(prompt), model.config.num_tokens)
        if isinstance(state, DecodeState):
            raise ValueError("a list of prompts continues a ModelState or starts fresh: state must not be a DecodeState")
        state = checked_state(model.config, state, len(prompts))
        return _prefill_apart(model, prompts, state)
    tokens = as_batch(prompt, model.config.num_tokens, "tokens")
    ds = as_decode_state(model, state, tokens.shape[0])
    if ds.per_row:  # rows at their own positions take one token per call
        for t in range(tokens.shape[1]):
            logits, ds = _fed(model, ds, tokens[:, t], token_pass)
        return logits, ds
    hidden, ds = _prefill_together(model, tokens, ds)
    return model.logits(hidden), (rows_apart(model, ds) if rows_own else ds)


def _prefill_apart(model, prompts: list[Tensor], state: ModelState) -> tuple[Tensor, DecodeState]:
    """Prompts of different lengths: each group of equal length prefilled together from its rows of ``state``,
    then gathered into one decode state whose rows keep their own positions."""
    lengths = torch.tensor([len(p) for p in prompts])
    last, parts = [None] * len(prompts), []
    for length in sorted(set(lengths.tolist())):
        rows = (lengths == length).nonzero()[:, 0]
        tokens = torch.stack([prompts[r] for r in rows.tolist()])
        group = start(model, state.select_rows(rows.to(model.device)), len(rows))
        hidden, ds = _prefill_together(model, tokens, group)
        for i, row in enumerate(rows.tolist()):
            last[row] = hidden[i]
        parts.append((rows, ds))
    return model.logits(torch.stack(last)), _rows_apart(model, parts, len(prompts))


def decode_step(
    model, token: Tensor, decode_state: DecodeState, *, compiled: bool = False
) -> tuple[Tensor, DecodeState]:
    """Feed one token (B,) per row; return the next-token logits (B, V) and the next decode state.

    The cost is one token through every layer, attending to the memory and the block so far; a row whose token
    fills its block commits it (memory pushed, recurrent states written). Runs the model in its current mode
    (dropout in train mode, as prefill); call it under ``torch.no_grad`` to decode. ``compiled``: through
    ``torch.compile`` (:func:`compiled_token_pass`; the state continues with its rows at their own positions).
    """
    check_model(model)
    if not isinstance(token, Tensor) or token.ndim != 1:
        raise ValueError(f"token must be a 1-D tensor (batch,) of token ids, got {getattr(token, 'shape', token)!r}")
    check_tokens(token[:, None], model.config.num_tokens, "token")
    if not isinstance(decode_state, DecodeState):
        raise TypeError(f"decode_state must be a DecodeState, got {type(decode_state).__name__}")
    check_decode_state(model, decode_state, token.shape[0])
    return step(model, token, decode_state, compiled=compiled)
