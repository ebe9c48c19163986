"""Exact cached decoding: prefill a prompt of any length, then feed one token at a time.

Decoding runs the model's own layer call (``model.forward_tokens``) on the current block's caches, with
however many tokens are new: the rest of a block in prefill, one token per step. The decode state is
explicit and travels through every call, as the model state does in training:

    DecodeState = committed ModelState (XL memories and recurrent states after the last full block)
                + the recurrent states' views for this block (computed once, when the block starts)
                + per layer, the block's cache (memory keys prepared once, the block's keys/values so far)

Blocks sit at multiples of ``block_width`` from where the state starts (the document start for a fresh
state), exactly as ``model.run`` cuts a whole text, and a filled block is committed by ``model.commit_block``,
the call ``forward_block`` makes, so teacher-forced decoding reproduces ``model.run``'s logits at every position.

This module uses the model only through its methods (``embed``, ``open_block``, ``forward_tokens``,
``commit_block``, ``logits``), so the model class can offer the reference's ``generate`` on top of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model.checks import check_tokens
from ..model.model import BlockRecurrentModel
from ..model.layer import LayerCache
from ..model.recurrent import StateView
from ..model.state import ModelState, checked_state


# prefill runs a prompt's whole blocks side by side in pieces of at most this many tokens (bounding its memory)
PREFILL_SIDE_BY_SIDE_TOKENS = 1024


@dataclass(frozen=True)
class DecodeState:
    """Where incremental decoding stands; returned anew by every call, never changed in a way its holder sees.

    committed: the model state after the last complete block.
    views: per recurrent layer, the :class:`StateView` of ``committed.states`` used by this block's reads and by
        its commit.
    caches: per layer, the current block's :class:`LayerCache` (its buffers may be shared with the decode states
        before and after this one; a step copies them before writing where another state has written).
    batch_size: rows decoded side by side.
    """

    committed: ModelState
    views: tuple[StateView, ...]
    caches: tuple[LayerCache, ...]
    batch_size: int

    @property
    def position(self) -> int:
        """Tokens of the current block already fed, 0 <= position < block_width."""
        return self.caches[0].filled

    @property
    def partial(self) -> tuple[tuple[Tensor, Tensor], ...] | None:
        """Per layer, the raw (keys, values) (B, position, kv_dim) of the block so far; None at a block start."""
        if self.position == 0:
            return None
        return tuple(cache.block_keys() for cache in self.caches)


def check_model(model) -> None:
    """Decoding and evaluation take a BlockRecurrentModel (or a subclass, such as the reference's)."""
    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")


@contextlib.contextmanager
def eval_no_grad(model: nn.Module, inference: bool = False):
    """Run in eval mode (no dropout) without autograd; restore the caller's mode afterwards. ``inference``: under
    ``torch.inference_mode``, which skips autograd's bookkeeping on every operator (5-12% faster block steps in
    evaluation); for callers whose tensors never leave the context (a decode state would, and its buffers could
    then not be written outside it)."""
    was_training = model.training
    if was_training:  # switching walks every module: skip it when already in eval mode
        model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _open_block(model, committed: ModelState, batch_size: int) -> DecodeState:
    views, caches = model.open_block(committed, batch_size, token_by_token=True)
    return DecodeState(committed, views, caches, batch_size)


def start(model, state: ModelState | None, batch_size: int) -> DecodeState:
    """A decode state at a block boundary, from a committed model state (None: a fresh document)."""
    return _open_block(model, checked_state(model.config, state, batch_size), batch_size)


def commit_partial(model, decode_state: DecodeState) -> ModelState:
    """The model state with the partly filled block committed, as ``model.run`` commits a call's last block.

    Continuing from it starts a new block, so it equals running the text seen so far in one ``run`` call,
    not the whole document: use the DecodeState itself to continue exactly.
    """
    if decode_state.position == 0:
        return decode_state.committed
    return model.commit_block(decode_state.committed, decode_state.views, model.block_keys(decode_state.caches))


def feed(model, tokens: Tensor, ds: DecodeState) -> tuple[Tensor, DecodeState]:
    """Feed tokens (B, N) that fit in the current block (position + N <= block_width): the hidden states
    (B, N, D) and the next decode state. A block that fills is committed and the next one opened."""
    hidden, caches = model.forward_tokens(model.embed(tokens), ds.caches, ds.views)
    if caches[0].filled < model.config.block_width:
        return hidden, dataclasses.replace(ds, caches=caches)
    committed = model.commit_block(ds.committed, ds.views, model.block_keys(caches))  # exactly as forward_block commits
    return hidden, _open_block(model, committed, ds.batch_size)


def as_decode_state(model, state: ModelState | DecodeState | None, batch_size: int) -> DecodeState:
    """A checked DecodeState to continue from: given, or opened from a ModelState (None: a fresh document)."""
    if isinstance(state, DecodeState):
        check_decode_state(model, state, batch_size)
        return state
    if state is not None and not isinstance(state, ModelState):
        raise TypeError(f"state must be a ModelState, a DecodeState or None, got {type(state).__name__}")
    return start(model, state, batch_size)


def check_decode_state(model, ds: DecodeState, batch_size: int) -> None:
    config = model.config
    width = config.block_width
    if len(ds.caches) != config.depth:
        raise ValueError(f"state.caches has {len(ds.caches)} layers; this model has depth={config.depth}")
    positions = {cache.filled for cache in ds.caches}
    if len(positions) != 1 or not 0 <= ds.position < width:
        raise ValueError(
            f"state.position must be one int in [0, {width - 1}] (block_width={width}) for every layer, "
            f"got {sorted(positions)}"
        )
    if len(ds.views) != len(config.recurrent_layers):
        raise ValueError(
            f"state.views has {len(ds.views)} entries; this model has {len(config.recurrent_layers)} recurrent layers"
        )
    if ds.batch_size != batch_size:
        raise ValueError(f"state has batch size {ds.batch_size} but the prompt has {batch_size} rows")
    checked_state(config, ds.committed, batch_size)


def as_batch(tokens: Tensor, num_tokens: int, name: str) -> Tensor:
    """Token ids as (B, T): a 1-D tensor is one row. Raises on anything else or on ids out of range."""
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    check_tokens(tokens, num_tokens, name)
    return tokens


def prefill(model, tokens: Tensor, state: ModelState | DecodeState | None = None) -> tuple[Tensor, DecodeState]:
    """Consume a prompt (B, T) of any length; return the logits (B, V) after its last token and the decode state.

    Work goes in pieces that end on block boundaries (the first only completes a block a DecodeState left half
    full); runs of whole blocks go side by side (``model.forward_blocks``, up to PREFILL_SIDE_BY_SIDE_TOKENS at a
    time) where the config allows, so memory stays that of one such piece whatever T is. ``state``: where the
    prompt continues from (None: a fresh document; a ModelState starts a new block; a DecodeState continues its
    block). Runs the model in its current mode and grad setting: :func:`~block_recurrent.inference.generation.generate`
    wraps it in eval + no_grad.
    """
    check_model(model)
    tokens = as_batch(tokens, model.config.num_tokens, "tokens")
    B, T = tokens.shape
    W = model.config.block_width
    ds = as_decode_state(model, state, B)
    hidden, begin = None, 0
    while begin < T:
        whole = min(T - begin, PREFILL_SIDE_BY_SIDE_TOKENS) // W * W
        if ds.position == 0 and model.blocks_side_by_side and whole >= 2 * W:
            hidden, committed = model.forward_blocks(model.embed(tokens[:, begin : begin + whole]), ds.committed)
            ds, begin = _open_block(model, committed, B), begin + whole
            continue
        end = min(T, begin + W - ds.position)
        hidden, ds = feed(model, tokens[:, begin:end], ds)
        begin = end
    return model.logits(hidden[:, -1]), ds  # only the last position's logits are needed


def decode_step(model, token: Tensor, decode_state: DecodeState) -> tuple[Tensor, DecodeState]:
    """Feed one token (B,) per row; return the next-token logits (B, V) and the next decode state.

    The cost is one token through every layer, attending to the memory and the block so far; when the
    token fills its block, the block is committed (memories pushed, recurrent states written). Runs the model
    in its current mode (dropout in train mode, as prefill); call it under ``torch.no_grad`` to decode.
    """
    check_model(model)
    if not isinstance(token, Tensor) or token.ndim != 1:
        raise ValueError(f"token must be a 1-D tensor (batch,) of token ids, got {getattr(token, 'shape', token)!r}")
    check_tokens(token[:, None], model.config.num_tokens, "token")
    if not isinstance(decode_state, DecodeState):
        raise TypeError(f"decode_state must be a DecodeState, got {type(decode_state).__name__}")
    check_decode_state(model, decode_state, token.shape[0])
    hidden, ds = feed(model, token[:, None], decode_state)
    return model.logits(hidden[:, -1]), ds
