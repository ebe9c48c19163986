"""Exact cached generation: prefill a prompt of any length, then decode one token at a time.

The decode state is explicit and travels through every call, as the model state does in training:

    DecodeState = committed ModelState (XL memories and recurrent states after the last full block)
                + per layer, the raw keys/values of the current, partly filled block
                + the recurrent states' views for this block (computed once, when the block starts)
                + how many tokens of the block have been fed
                + per layer, the block's attention inputs ([memory, block so far] keys, normalised and
                  rotated once, and values), derived from the above and kept so that a step is cheap

Blocks sit at multiples of ``block_width`` from where the state starts (the document start for a fresh
state), exactly as ``model.run`` cuts a whole text. A new token attends to at most the memory plus its
block's earlier tokens, and when a block fills it is committed by ``model.commit_block``, the same call
``forward_block`` makes, so teacher-forced decoding reproduces ``model.run``'s logits at every position.

Entry points: :func:`generate` (tokens at once), :func:`stream` (tokens as they come), the building blocks
:func:`prefill`, :func:`decode_step`, :func:`sample`, and :func:`generate_reference` behind the
reference-compatible ``BlockRecurrentTransformer.generate`` / ``RecurrentTrainerWrapper.generate``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attend, split_kv_heads
from .recurrent import StateView
from .checks import check_float, check_int, check_tokens
from .state import ModelState, checked_state, state_from_reference

if TYPE_CHECKING:
    from .model import BlockRecurrentTransformer


@dataclass(frozen=True)
class DecodeState:
    """Where incremental decoding stands; returned anew by every call, never modified in place.

    committed: the model state after the last complete block.
    partial: per layer, raw (keys, values) of the current block's tokens so far, each (B, position, kv_dim);
        None while the block is empty (position == 0).
    views: per recurrent layer, the :class:`StateView` of ``committed.states`` used by this block's reads
        and by its commit.
    position: tokens of the current block already fed, 0 <= position < block_width.
    cache: per layer, the attention inputs of this block (:class:`LayerCache`), a pure function of
        ``committed``, ``partial`` and the weights, kept so that each key is normalised and rotated once;
        None until the first :func:`decode_step` of a block builds it. Its block-sized buffers may be
        shared with the states before and after this one; a step writes only past every state's prefix
        and copies them first when that slot is taken (decoding twice from one state is safe).
    """

    committed: ModelState
    partial: tuple[tuple[Tensor, Tensor], ...] | None
    views: tuple[StateView, ...]
    position: int
    cache: tuple["LayerCache", ...] | None = None

    @property
    def batch_size(self) -> int:
        if self.partial is not None:
            return self.partial[0][0].shape[0]
        if self.views:
            return self.views[0].state.shape[0]
        size = self.committed.batch_size
        if size is None:
            raise ValueError("this DecodeState holds no tensor to tell its batch size")
        return size


def start(model: "BlockRecurrentTransformer", state: ModelState | None, batch_size: int) -> DecodeState:
    """A decode state at a block boundary, from a committed model state (None: a fresh document)."""
    state = checked_state(model.config, state, batch_size)
    return DecodeState(state, None, model.state_views(state, batch_size), 0)


def commit_partial(model: "BlockRecurrentTransformer", decode_state: DecodeState) -> ModelState:
    """The model state with the partly filled block committed, as ``model.run`` commits a call's last block.

    Continuing from it starts a new block, so it equals running the text seen so far in one ``run`` call,
    not the whole document: use the DecodeState itself to continue exactly.
    """
    if decode_state.partial is None:
        return decode_state.committed
    keys = tuple(k for k, _ in decode_state.partial)
    values = tuple(v for _, v in decode_state.partial)
    return model.commit_block(decode_state.committed, decode_state.views, keys, values)


class LayerCache(NamedTuple):
    """One layer's attention inputs for the current block, in buffers sized for the whole block.

    The buffers hold [memory, block] along the key axis and are written one slot per token, so a step
    copies one key instead of re-concatenating the block so far. Several DecodeStates may share them:
    each sees only its own prefix, and ``written`` (shared, the one mutable part) says how far any of
    them has written, so a step from an older state copies the buffers before writing (copy on write).
    """

    keys: Tensor | None  # (B, kv_heads, M + W, dh): normalised (qk-norm layers), rotated (rotary) at their slots
    values: Tensor | None  # (B, M + W, kv_dim): raw, as values are never transformed
    raw_keys: Tensor | None  # (B, W, kv_dim): the block's raw keys, for the commit (None until the first write)
    written: list  # [slots of the block written so far by any state sharing these buffers]
    memory_len: int  # M
    # what each of the block's W positions sees, from AttentionBlock.visibility, or None where it sees
    # every key so far: mask (W, M + W) or (B, 1, W, M + W) bool, T5 bias (H, W, M + W), and the rows
    # that see nothing (sliding window at a document's first token), (W, 1) or (B, 1, W, 1)
    mask: Tensor | None
    bias: Tensor | None
    empty: Tensor | None
    # derived from the weights once per block: [to_q; to_kv; each read's to_queries] as one matrix, so a
    # token needs one vector-matrix product for all of them, and each read state's keys prepared once.
    # The wide input projections are kept transposed, (D, out), contiguous: for one token x @ W^T on them
    # ran 1.2-3x faster on CPU than F.linear(x, W), equal up to rounding (summation order)
    in_proj: Tensor  # (D, Q + 2 kv_dim + reads * Q)
    ff_in: Tensor  # (D, proj_in's outputs): FeedForward.proj_in, transposed
    read_keys: tuple[Tensor, ...]
    # the block's W frame slots' rotary tables (q cos, q signed sin, k cos, k signed sin), each (W, dh),
    # shared by all layers (None with T5 positions): see _rotate
    slot_tables: tuple[Tensor, Tensor, Tensor, Tensor] | None


def _layer_cache(
    model: "BlockRecurrentTransformer", layer: int, ds: DecodeState, slot_tables: tuple | None
) -> LayerCache:
    """Prepare the memory and the block's earlier keys of one layer once, as AttentionBlock.forward would."""
    attn = model.layers[layer].attn
    W = model.config.block_width
    memory = ds.committed.memories[layer]
    pieces = ([] if memory is None else [(memory.keys, memory.values)]) + (
        [] if ds.partial is None else [ds.partial[layer]]
    )
    M = 0 if memory is None else memory.length
    keys = values = raw_keys = None
    if pieces:
        known = torch.cat([k for k, _ in pieces], dim=1)  # (B, M + P, kv_dim)
        tables = attn.rotary_tables(model.rotary, M, ds.position, 0)
        known = attn.attn.prepare_keys(known, None if tables is None else tables[1])  # (B, K, M + P, dh)
        keys = _buffer(known, M + W, axis=2)
        values = _buffer(torch.cat([v for _, v in pieces], dim=1), M + W, axis=1)
    if ds.partial is not None:
        raw_keys = _buffer(ds.partial[layer][0], W, axis=1)

    # the whole block's visibility at once; a step reads its row
    mask = bias = empty = None
    valid = None if memory is None else memory.valid
    if valid is not None or attn.sliding_window or attn.position_bias is not None:
        device = model.token_emb.weight.device
        mask, bias, empty = attn.visibility(M, 0, W, valid, device)
        if valid is None and not attn.sliding_window:
            mask = None  # causal only: the newest token sees every key so far

    # the weights' derived forms, once per block (a few hundred KB copied per layer every block_width tokens)
    reads = list(attn.state_reads)
    in_proj = torch.cat([attn.to_q.weight, attn.to_kv.weight, *(r.to_queries.weight for r in reads)])
    in_proj = in_proj.t().contiguous()  # (D, Q + 2 kv_dim + reads * Q)
    ff_in = model.layers[layer].ff.proj_in.weight.t().contiguous()  # (D, proj_in's outputs)
    read_keys = tuple(r.attn.prepare_keys(ds.views[i].keys, None) for r, i in zip(reads, attn.reads))
    return LayerCache(
        keys, values, raw_keys, [ds.position], M, mask, bias, empty, in_proj, ff_in, read_keys, slot_tables
    )


def _slot_tables(model: "BlockRecurrentTransformer") -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Rotary tables of the block's W frame slots with the sine's first half negated (see _rotate)."""
    if model.config.position_encoding != "rotary_xpos":
        return None
    W, rotary = model.config.block_width, model.rotary
    half = rotary.q_sin.shape[-1] // 2
    q, k = rotary.queries(rotary.width - W, rotary.width), rotary.keys(rotary.width - W, rotary.width)
    signed = lambda sin: torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # (W, dh)
    return q.cos, signed(q.sin), k.cos, signed(k.sin)


def _rotate(t: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """apply_rotary with the same result in fewer operator calls: tables = (cos, signed sin); rotate_half(t) *
    sin, i.e. [-t2, t1] * [s1, s2], equals [t2, t1] * [-s1, s2] exactly (negation is exact), and [t2, t1] is
    a roll. Passed as ``rotate`` to Attention.prepare_queries / prepare_keys (the float64 exactness tests of
    the rotary and qk-norm variants hold it to the forward pass)."""
    cos, signed_sin = tables
    return t * cos.to(t.dtype) + t.roll(t.shape[-1] // 2, dims=-1) * signed_sin.to(t.dtype)


def _buffer(known: Tensor, capacity: int, axis: int) -> Tensor:
    """A buffer of ``capacity`` slots along ``axis`` whose first slots hold ``known``."""
    shape = list(known.shape)
    shape[axis] = capacity
    buffer = known.new_empty(shape)
    buffer.narrow(axis, 0, known.shape[axis]).copy_(known)
    return buffer


def _must_copy(buffer: Tensor, cache: LayerCache, position: int) -> bool:
    """Whether writing slot ``position`` in place could change what another state or autograd sees."""
    return (
        cache.written[0] > position  # another continuation of an older state has written here
        or torch.is_grad_enabled()  # views of the buffer may be saved for backward
        or (buffer.is_inference() and not torch.is_inference_mode_enabled())  # cannot be written outside it
    )


def _write(buffer: Tensor | None, at: int, new: Tensor, capacity: int, copy: bool, axis: int) -> Tensor:
    """``buffer`` (or a copy, or a new one of ``capacity`` slots) with slot ``at`` along ``axis`` set to
    ``new`` (one slot wide along ``axis``)."""
    if buffer is None:
        shape = list(new.shape)
        shape[axis] = capacity
        buffer = new.new_empty(shape)
    elif copy:
        buffer = buffer.clone()
    buffer.narrow(axis, at, 1).copy_(new)  # cast to the buffer's dtype, as the concatenation did
    return buffer


def _attention_step(
    model: "BlockRecurrentTransformer",
    layer: int,
    x: Tensor,
    cache: LayerCache,
    ds: DecodeState,
    tables: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None,
) -> tuple[Tensor, LayerCache]:
    """One token x (B, 1, D) through one layer's attention: (branch (B, 1, D), next cache).

    The same computation as AttentionBlock.forward with a prefix, except that the earlier keys come
    prepared from the cache, the visibility rows were computed once for the block, q, k, v and the
    state-read queries come from one product with the block's fused projection, and weights are applied
    directly rather than through module calls (for one token, operator and module dispatch cost about as
    much as the arithmetic, so every call saved counts).
    """
    attn = model.layers[layer].attn
    B, P, M, W = x.shape[0], ds.position, cache.memory_len, model.config.block_width
    H, dh, K, C = attn.heads, model.config.dim_head, model.config.kv_heads, model.config.kv_dim
    Q = H * dh
    normed = F.layer_norm(x, x.shape[-1:], attn.norm.weight, None, attn.norm.eps)
    projected = torch.matmul(normed, cache.in_proj)  # (B, 1, Q + 2 C + reads * Q)
    q = projected[..., :Q].view(B, H, 1, dh)  # one token: (B, 1, H * dh) is (B, H, 1, dh) in memory
    key, value = projected[..., Q : Q + C], projected[..., Q + C : Q + 2 * C]  # (B, 1, C) each, raw

    q_tables, k_tables = (None, None) if not attn.use_rotary else tables
    q, scale = attn.attn.prepare_queries(q, q_tables, _rotate)

    # write this token's slot: prepared key and value for attention, raw key for the commit
    copy = cache.keys is not None and _must_copy(cache.keys, cache, P)  # no buffer yet: a new one either way
    written = [P + 1] if copy else cache.written
    keys = _write(cache.keys, M + P, attn.attn.prepare_keys(key, k_tables, _rotate), M + W, copy, axis=2)
    values = _write(cache.values, M + P, value, M + W, copy, axis=1)
    raw_keys = _write(cache.raw_keys, P, key, W, copy, axis=1)
    written[0] = P + 1

    J = M + P + 1
    mask = None if cache.mask is None else cache.mask[..., P : P + 1, :J]  # (1, J) or (B, 1, 1, J)
    bias = None if cache.bias is None else cache.bias[:, P : P + 1, :J]  # (H, 1, J)
    out = attend(
        q, keys[:, :, :J], split_kv_heads(values[:, :J], K), mask, scale=scale, bias=bias,
        implementation=attn.attn.implementation,
    )
    if cache.empty is not None:
        out = out.masked_fill(cache.empty[..., P : P + 1, :], 0.0)  # nothing to see: read nothing
    outs = [out.reshape(B, 1, Q)]  # (B, H, 1, dh) -> (B, 1, H * dh), a view for one token

    # reads of the recurrent states, as StateRead.forward, with the state keys prepared once per block
    for n, (read, i) in enumerate(zip(attn.state_reads, attn.reads)):
        begin = Q + 2 * C + n * Q
        rq, read_scale = read.attn.prepare_queries(projected[..., begin : begin + Q].view(B, H, 1, dh), None)
        read_values = split_kv_heads(ds.views[i].values, K)
        read_out = attend(rq, cache.read_keys[n], read_values, scale=read_scale, implementation=read.attn.implementation)
        outs.append(read_out.reshape(B, 1, Q))

    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (B, 1, (1 + reads) * H * dh)
    branch = F.linear(out, attn.to_out.weight)
    return branch, cache._replace(keys=keys, values=values, raw_keys=raw_keys, written=written)


def _feed_forward(ff, ff_in: Tensor, x: Tensor) -> Tensor:
    """FeedForward.forward without dropout, on the weights directly (one token: dispatch dominates)."""
    normed = F.layer_norm(x, x.shape[-1:], ff.norm.weight, None, ff.norm.eps)
    return F.linear(ff.activate(torch.matmul(normed, ff_in)), ff.proj_out.weight)


def _step(model: "BlockRecurrentTransformer", token: Tensor, ds: DecodeState) -> tuple[Tensor, DecodeState]:
    """Feed one token (B,) with the cache: (hidden (B, 1, D), next decode state). Inference only: no dropout."""
    # 1. prepare this block's keys once (after a commit, or after a prefill that ended mid-block)
    caches = ds.cache
    if caches is None:
        slot_tables = _slot_tables(model)
        caches = tuple(_layer_cache(model, layer, ds, slot_tables) for layer in range(model.config.depth))
    # this token's rotary tables, sliced once for every layer: (q cos, q sin), (k cos, k sin), each (1, dh)
    tables = None
    if caches[0].slot_tables is not None:
        q_cos, q_sin, k_cos, k_sin = (t[ds.position : ds.position + 1] for t in caches[0].slot_tables)
        tables = (q_cos, q_sin), (k_cos, k_sin)

    # 2. the token through every layer, keeping its raw key/value for the block's commit
    x = F.embedding(token[:, None], model.token_emb.weight)  # (B, 1, D)
    next_caches, partial = [], []
    end = ds.position + 1
    for layer, cache in enumerate(caches):
        branch, cache = _attention_step(model, layer, x, cache, ds, tables)
        x = x + branch
        x = x + _feed_forward(model.layers[layer].ff, cache.ff_in, x)
        M = cache.memory_len
        partial.append((cache.raw_keys[:, :end], cache.values[:, M : M + end]))  # (B, P + 1, kv_dim) views
        next_caches.append(cache)

    # 3. a full block is committed exactly as forward_block commits it
    if end < model.config.block_width:
        return x, DecodeState(ds.committed, tuple(partial), ds.views, end, tuple(next_caches))
    keys, values = zip(*partial)
    committed = model.commit_block(ds.committed, ds.views, keys, values)
    return x, DecodeState(committed, None, model.state_views(committed, x.shape[0]), 0)


# prefill: whole pieces of blocks at once


def _feed(model: "BlockRecurrentTransformer", tokens: Tensor, ds: DecodeState) -> tuple[Tensor, DecodeState]:
    """Feed tokens (B, N) that fit in the current block (position + N <= block_width).

    Returns the hidden states (B, N, D) and the next decode state; a block that fills is committed.
    """
    x = model.token_emb(tokens)  # (B, N, D)
    hidden, keys, values = model.forward_tokens(x, ds.committed.memories, ds.views, ds.partial)
    position = ds.position + tokens.shape[1]
    if position < model.config.block_width:
        return hidden, DecodeState(ds.committed, tuple(zip(keys, values)), ds.views, position)
    # the block is full: commit it exactly as forward_block does, then open the next one
    committed = model.commit_block(ds.committed, ds.views, keys, values)
    return hidden, DecodeState(committed, None, model.state_views(committed, tokens.shape[0]), 0)


def _to_decode_state(
    model: "BlockRecurrentTransformer", state: ModelState | DecodeState | None, batch_size: int
) -> DecodeState:
    if isinstance(state, DecodeState):
        _check_decode_state(model, state, batch_size)
        return state
    if state is not None and not isinstance(state, ModelState):
        raise TypeError(f"state must be a ModelState, a DecodeState or None, got {type(state).__name__}")
    return start(model, state, batch_size)


def _check_decode_state(model: "BlockRecurrentTransformer", ds: DecodeState, batch_size: int) -> None:
    width = model.config.block_width
    if isinstance(ds.position, bool) or not isinstance(ds.position, int) or not 0 <= ds.position < width:
        raise ValueError(f"state.position must be an int in [0, {width - 1}] (block_width={width}), got {ds.position!r}")
    if (ds.partial is None) != (ds.position == 0):
        raise ValueError("state.partial must be None exactly when state.position is 0")
    if ds.partial is not None and len(ds.partial) != model.config.depth:
        raise ValueError(f"state.partial has {len(ds.partial)} layers; this model has depth={model.config.depth}")
    if len(ds.views) != len(model.config.recurrent_layers):
        raise ValueError(
            f"state.views has {len(ds.views)} entries; this model has {len(model.config.recurrent_layers)} recurrent layers"
        )
    if ds.batch_size != batch_size:
        raise ValueError(f"state has batch size {ds.batch_size} but the prompt has {batch_size} rows")
    checked_state(model.config, ds.committed, batch_size)


def _as_batch(tokens: Tensor, num_tokens: int, name: str) -> Tensor:
    """Token ids as (B, T): a 1-D tensor is one row. Raises on anything else or on ids out of range."""
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    check_tokens(tokens, num_tokens, name)
    return tokens


def prefill(
    model: "BlockRecurrentTransformer", tokens: Tensor, state: ModelState | DecodeState | None = None
) -> tuple[Tensor, DecodeState]:
    """Consume a prompt (B, T) of any length; return the logits (B, V) after its last token and the decode state.

    Work goes block by block (the first piece only completes a block a DecodeState left half full), so
    memory stays that of one block whatever T is. ``state``: where the prompt continues from (None: a fresh
    document; a ModelState starts a new block; a DecodeState continues its block). Runs the model in its
    current mode and grad setting: :func:`generate` and :func:`stream` wrap it in eval + no_grad.
    """
    tokens = _as_batch(tokens, model.config.num_tokens, "tokens")
    B, T = tokens.shape
    ds = _to_decode_state(model, state, B)
    width = model.config.block_width

    # 1. pieces that end on block boundaries: first to the end of the current block, then whole blocks
    hidden, begin = None, 0
    while begin < T:
        end = min(T, begin + width - ds.position)
        hidden, ds = _feed(model, tokens[:, begin:end], ds)
        begin = end
    # 2. only the last position's logits are kept
    return model.logits(hidden[:, -1]), ds


def decode_step(
    model: "BlockRecurrentTransformer", token: Tensor, decode_state: DecodeState
) -> tuple[Tensor, DecodeState]:
    """Feed one token (B,) per row; return the next-token logits (B, V) and the next decode state.

    The cost is one token through every layer, attending to the memory and the block so far; when the
    token fills its block, the block is committed (memories pushed, recurrent states written).
    Inference only: it applies no dropout whatever the model's mode (call it under ``torch.no_grad``).
    """
    if not isinstance(token, Tensor) or token.ndim != 1:
        raise ValueError(f"token must be a 1-D tensor (batch,) of token ids, got {getattr(token, 'shape', token)!r}")
    tokens = token[:, None]  # (B, 1)
    check_tokens(tokens, model.config.num_tokens, "token")
    if not isinstance(decode_state, DecodeState):
        raise TypeError(f"decode_state must be a DecodeState, got {type(decode_state).__name__}")
    _check_decode_state(model, decode_state, token.shape[0])
    hidden, ds = _step(model, token, decode_state)
    return model.logits(hidden[:, -1]), ds


# sampling


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row from logits (B, V): greedy when temperature is 0, else softmax(logits / T)
    restricted to the ``top_k`` most likely ids and then to the smallest set of mass >= ``top_p``."""
    logits = logits.float()  # sample in float32 whatever autocast produced
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _nucleus(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Keep the most likely ids until their mass reaches top_p (always at least the most likely one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)  # (B, V), most likely first
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p  # an id is kept while the mass of the ids before it is < top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _check_sampling(
    model: "BlockRecurrentTransformer",
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token: int | None,
    generator: torch.Generator | None,
) -> None:
    vocab = model.config.num_tokens
    check_int("max_new_tokens", max_new_tokens, 0)
    check_float("temperature", temperature, 0.0)
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None:
        check_float("top_p", top_p, 0.0, 1.0)
        if top_p == 0:
            raise ValueError("top_p must be in (0, 1], got 0")
    if eos_token is not None:
        check_int("eos_token", eos_token, 0)
        if eos_token >= vocab:
            raise ValueError(f"eos_token must be in [0, {vocab - 1}], got {eos_token}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


@contextlib.contextmanager
def eval_no_grad(model: "BlockRecurrentTransformer"):
    """Run in eval mode (no dropout) without autograd; restore the caller's mode afterwards."""
    was_training = model.training
    if was_training:  # switching walks every module: skip it when already in eval mode
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


# the loop


def _decode_loop(
    model: "BlockRecurrentTransformer",
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token: int | None,
    generator: torch.Generator | None,
    state: ModelState | DecodeState | None,
    final: list,
) -> Iterator[Tensor]:
    """Yield (B,) tokens; ``final`` receives the decode state covering everything fed (all but the last token).

    Rows that produced ``eos_token`` keep yielding it; the loop stops once every row has.
    """
    with eval_no_grad(model):
        logits, ds = prefill(model, prompt, state)
    done = None
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_token is not None:
            if done is not None:
                token = torch.where(done, eos_token, token)  # finished rows are padded with the end token
            done = token == eos_token if done is None else done | (token == eos_token)
        final[:] = [ds]
        yield token
        if step + 1 == max_new_tokens or (done is not None and bool(done.all())):
            return
        with eval_no_grad(model):
            hidden, ds = _step(model, token, ds)  # sampled ids need no range check
            logits = model.logits(hidden[:, -1])
    final[:] = [ds]


def _prepare(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator) -> Tensor:
    from .model import BlockRecurrentTransformer

    if not isinstance(model, BlockRecurrentTransformer):
        raise TypeError(f"model must be a BlockRecurrentTransformer, got {type(model).__name__}")
    _check_sampling(model, max_new_tokens, temperature, top_k, top_p, eos_token, generator)
    return _as_batch(prompt, model.config.num_tokens, "prompt")


def stream(
    model: "BlockRecurrentTransformer",
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
    state: ModelState | DecodeState | None = None,
) -> Iterator[Tensor]:
    """Like :func:`generate`, but yields each new token (B,) as soon as it is sampled.

    Arguments are checked when this is called, before the first token is asked for.
    """
    prompt = _prepare(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator)
    state = _to_decode_state(model, state, prompt.shape[0])  # checked now, not at the first token
    return _decode_loop(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator, state, [])


def generate(
    model: "BlockRecurrentTransformer",
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
    state: ModelState | DecodeState | None = None,
    return_state: bool = False,
):
    """Continue ``prompt`` (B, T) by up to ``max_new_tokens`` tokens: returns (B, new) token ids.

    prompt: token ids, (B, T) or (T,) for one row, T >= 1 and of any length (consumed block by block).
    temperature: 0 is greedy (argmax); otherwise sample from softmax(logits / temperature), optionally
        restricted to the ``top_k`` most likely ids and then to the nucleus of mass ``top_p``.
    eos_token: a row that produces it is finished and padded with it; generation stops early once every
        row is finished, so ``new`` may be < max_new_tokens.
    generator: a torch.Generator (on the model's device) for reproducible sampling.
    state: continue a document: a ModelState (the prompt starts a new block) or the DecodeState a previous
        call returned (exact continuation; pass the last token it generated as the next prompt).
    return_state: also return the DecodeState after all tokens but the last generated one (which has not
        been fed to the model yet), i.e. ``(tokens, decode_state)``.

    Runs in eval mode without autograd (the caller's mode is restored); works under
    ``torch.inference_mode`` and CUDA autocast. The cost per new token is one token's pass against at most
    the memory plus one block, so it does not grow with the output's length.
    """
    prompt = _prepare(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator)
    final: list = []
    loop = _decode_loop(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator, state, final)
    tokens = list(loop)
    B = prompt.shape[0]
    out = torch.stack(tokens, dim=1) if tokens else prompt.new_empty((B, 0))  # (B, new)
    return (out, final[0]) if return_state else out


# the reference's interface


def generate_reference(
    model: "BlockRecurrentTransformer",
    prime: Tensor,
    length: int | None = None,
    xl_memories: Sequence = (),
    states: Sequence = (),
    temperature: float = 1.0,
    filter_thres: float = 0.9,
    return_memories_and_states: bool = False,
):
    """The reference port's ``generate``, on the cache and without its length limits.

    ``length`` counts the prime (default max_seq_len + 1); returns the ``length - prime_len`` new tokens
    (B, length - prime_len). ``filter_thres`` keeps the ceil((1 - filter_thres) * num_tokens) most likely
    ids, as the reference's ``top_k``. With ``return_memories_and_states``, also the memories and states
    after every token but the last generated one, as ``model(x[:, :-1], return_memories_and_states=True)``
    would return them: feed that last token as the next prime to continue, as the reference's wrapper does.
    """
    check_tokens(prime, model.config.num_tokens, "prime")
    B, prime_len = prime.shape
    length = model.config.max_seq_len + 1 if length is None else length
    check_int("length", length, prime_len + 1)
    check_float("filter_thres", filter_thres, 0.0, 1.0, open_high=True)
    top_k = max(1, math.ceil((1 - filter_thres) * model.config.num_tokens))
    state = state_from_reference(model.config, xl_memories, states, B)

    out, ds = generate(
        model, prime, length - prime_len, temperature=temperature, top_k=top_k, state=state, return_state=True
    )
    if not return_memories_and_states:
        return out
    with eval_no_grad(model):
        committed = commit_partial(model, ds)
    return out, list(committed.memories), list(committed.states)
