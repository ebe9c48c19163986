"""One layer of the stack: self-attention over [XL memory, block so far] plus reads of recurrent states,
then a feed-forward, for any number of new tokens of the current block.

The same call serves every caller. Training runs a whole block at once (N = block_width), prefill the rest
of a block, decoding one token (N = 1). What a layer needs for the current block is a :class:`LayerCache`,
built once when the block starts (:meth:`AttentionBlock.open_block`): the memory's keys already normalised
and rotated, the state reads' keys, which key each query may see, and the projection weights side by side.

The cache is this module's own: callers hold it and pass it back, and change it only through the methods
here. Rows either share one position in the block (an int: training, evaluation, a rectangular decode) or
each stand at their own (a (B,) tensor: prompts of different lengths, compiled decoding, whose buffers keep
one shape); the two differ only in how a token's key is written and which keys a query sees.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, FeedForward, attend, split_kv_heads
from .config import BlockRecurrentConfig
from .memory import build_memory
from .positions import RotaryTables, RotaryXPos, T5RelativeBias
from .recurrent import DeltaStateCell, RecurrentStateCell, StateRead, StateView
from .state import XLMemory


class LayerCache(NamedTuple):
    """One layer's attention inputs for the current block.

    Keys and values along the key axis are [memory (M slots), block so far (P slots)]. Under autograd they are
    exactly that long and a call concatenates; without autograd they live in buffers of M + block_width slots
    that a call writes in place (one slot per token when decoding, instead of re-concatenating the block). The
    decoder copies the buffers before writing where an older decode state shares them with a newer one
    (:meth:`AttentionBlock.copy_buffers`).
    """

    keys: Tensor | None  # (B, kv_heads, >= M + P, dh): normalised (qk-norm layers) and rotated (rotary) keys
    values: Tensor | None  # (B, >= M + P, kv_dim): raw values (values are never transformed)
    raw_keys: Tensor | None  # (B, >= P, kv_dim): the block's keys as projected, which the commit stores
    memory_len: int  # M
    # P: tokens of the block fed so far; an int when the rows share it, a (B,) tensor when each row stands at its
    # own position (then one token per row per call, written in buffers of M + block_width slots)
    filled: int | Tensor
    # which keys each of the block's W positions sees, from AttentionBlock.visibility: mask (W, M + W) or
    # (B, 1, W, M + W) bool (None: every key so far, the plain causal case), T5 bias (H, W, M + W) or None,
    # and the rows that see nothing (sliding window at a document's first token), (W, 1) or (B, 1, W, 1)
    mask: Tensor | None
    bias: Tensor | None
    empty: Tensor | None
    read_keys: tuple[Tensor, ...]  # per state read, the state's keys prepared once for the block
    # the layer's input projections side by side and transposed, (D, H dh + 2 kv_dim + reads * H dh): one matrix
    # product per call for queries, keys, values and state-read queries; and the feed-forward's input projection,
    # transposed. Contiguous copies when the block is decoded token by token (a vector times a contiguous
    # (D, out) matrix is faster than F.linear on the CPU), views otherwise
    in_proj: Tensor
    ff_in: Tensor


def _extend(buffer: Tensor | None, length: int, new: Tensor, capacity: int, axis: int) -> Tensor:
    """``buffer``'s first ``length`` slots along ``axis`` followed by ``new``: under autograd a new tensor of
    exactly that length (autograd may keep views of the old one); otherwise ``new`` written in place into a
    buffer of ``capacity`` slots, allocated when there is none of that size or it cannot be written here."""
    if torch.is_grad_enabled():
        return new if buffer is None or length == 0 else torch.cat((buffer.narrow(axis, 0, length), new), dim=axis)
    if (
        buffer is None or buffer.shape[axis] != capacity
        or (buffer.is_inference() and not torch.is_inference_mode_enabled())  # cannot be written outside it
    ):
        shape = list(new.shape)
        shape[axis] = capacity
        fresh = new.new_empty(shape)
        if buffer is not None and length:
            fresh.narrow(axis, 0, length).copy_(buffer.narrow(axis, 0, length))
        buffer = fresh
    buffer.narrow(axis, length, new.shape[axis]).copy_(new)  # cast to the buffer's dtype, as cat would
    return buffer


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over [XL memory, block so far], plus reads of recurrent states."""

    def __init__(self, config: BlockRecurrentConfig, layer: int):
        super().__init__()
        dim, heads, dim_head = config.dim, config.heads, config.dim_head
        inner = heads * dim_head
        self.heads, self.dim_head, self.kv_dim = heads, dim_head, config.kv_dim
        self.block_width = config.block_width
        self.is_recurrent = layer in config.recurrent_layers
        # the recurrent states this layer reads (indices into config.recurrent_layers), one StateRead each
        self.reads = config.reads_of_layer(layer)
        self.state_reads = nn.ModuleList([StateRead(config) for _ in self.reads])

        self.norm = nn.LayerNorm(dim, bias=False)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, config.kv_dim * 2, bias=False)  # kv_heads key/value heads (1: multi-query)
        self.attn = Attention(
            dim_head,
            heads,
            kv_heads=config.kv_heads,
            qk_norm=config.all_layers_qk_rmsnorm or self.is_recurrent,
            gains=config.qk_norm_gains,
            temperature=config.qk_rmsnorm_scale,
            dropout=config.attn_dropout,
            implementation=config.attn_implementation,
        )
        # positions: rotary + xPos (reference) or a T5 relative bias (paper), on token self-attention only
        self.use_rotary = config.position_encoding == "rotary_xpos"
        self.position_bias = None
        if config.position_encoding == "t5":
            self.position_bias = T5RelativeBias(heads, config.t5_num_buckets, config.t5_max_distance)
        self.sliding_window = config.attention_window == "sliding"
        # self-attention output and each state read are concatenated, then projected once
        self.to_out = nn.Linear(inner * (1 + len(self.reads)), dim, bias=False)
        self.memory = build_memory(config)
        self.cell = None
        if self.is_recurrent:
            self.cell = DeltaStateCell(config) if config.state_write == "delta" else RecurrentStateCell(config)

    def open_block(
        self, memory: XLMemory | None, views: Sequence[StateView], rotary: RotaryXPos, ff: FeedForward,
        token_by_token: bool = False,
    ) -> LayerCache:
        """The cache for a block that starts after ``memory``: everything that is the same for all its tokens.
        ``token_by_token``: keep contiguous copies of the input projections (see :meth:`BlockRecurrentModel.open_block`)."""
        M = 0 if memory is None else memory.length
        keys = values = None
        if memory is not None:
            keys = self.attn.prepare_keys(memory.keys, rotary.keys(-M, 0) if self.use_rotary else None)
            values = memory.values
        W = self.block_width
        valid = None if memory is None else memory.valid
        device = rotary.q_cos.device
        mask, bias, empty = self.visibility(M, 0, W, valid, device)
        if valid is None and not self.sliding_window:
            mask = None  # the plain causal case: built per call, only where a call has several queries
        read_keys = tuple(read.prepare_keys(views[i]) for read, i in zip(self.state_reads, self.reads))
        in_proj, ff_in = self.input_projection(), ff.proj_in.weight.t()  # (D, outputs)
        if token_by_token and not torch.is_grad_enabled():
            # copied once per block for its block_width decoding calls; evaluation would copy once per call
            # (13% of its time with blocks of 16)
            in_proj, ff_in = in_proj.contiguous(), ff_in.contiguous()
        return LayerCache(keys, values, None, M, 0, mask, bias, empty, read_keys, in_proj, ff_in)

    def refill(self, cache: LayerCache, raw_keys: Tensor, values: Tensor, rotary: RotaryXPos) -> LayerCache:
        """``cache``, a block just opened, with the P tokens whose raw keys and values (B, P, kv_dim) are given
        written as feeding them wrote them: a saved decode state, rebuilt without running its tokens again."""
        tables = rotary.keys(0, raw_keys.shape[1]) if self.use_rotary else None
        return self._write(cache, self.attn.prepare_keys(raw_keys, tables), values, raw_keys)

    def input_projection(self) -> Tensor:
        """The input projections side by side, transposed: (D, H dh + 2 kv_dim + reads * H dh), a view."""
        weights = [self.to_q.weight, self.to_kv.weight, *(r.to_queries.weight for r in self.state_reads)]
        return torch.cat(weights).t()

    def project(self, x: Tensor, in_proj: Tensor) -> Tensor:
        """Pre-norm, then queries, raw keys, values and state-read queries of x (B, N, D) in one product."""
        normed = F.layer_norm(x, x.shape[-1:], self.norm.weight, None, self.norm.eps)
        return normed @ in_proj  # (B, N, Q + 2 C + reads * Q)

    def split_keys_values(self, projected: Tensor) -> tuple[Tensor, Tensor]:
        """The raw keys and values (B, N, kv_dim) each of a :meth:`project` output."""
        Q, C = self.heads * self.dim_head, self.kv_dim
        return projected[..., Q : Q + C], projected[..., Q + C : Q + 2 * C]

    def forward(
        self, x: Tensor, cache: LayerCache, views: Sequence[StateView], tables: tuple[RotaryTables, RotaryTables] | None,
        projected: Tensor | None = None,
    ) -> tuple[Tensor, LayerCache]:
        """x: (B, N, D), the block's next N tokens (after the cache's P); tables: the rotary tables of their
        queries and keys (None without rotary positions); ``projected``: :meth:`project` of x when the caller
        already has it. Returns (branch output (B, N, D) to add to the residual, the cache with these tokens
        appended)."""
        B, N, _ = x.shape
        H, dh, C = self.heads, self.dim_head, self.kv_dim
        Q = H * dh
        P = cache.filled
        per_row = isinstance(P, Tensor)
        if per_row and N != 1:
            raise ValueError(f"rows at different positions take one token each, got {N}")
        if not per_row and P + N > self.block_width:
            raise ValueError(f"{N} tokens do not fit in the block: {P} of block_width={self.block_width} are fed")

        # 1. one product for queries, keys, values and the state reads' queries
        if projected is None:
            projected = self.project(x, cache.in_proj)
        q = projected[..., :Q].view(B, N, H, dh).transpose(1, 2)  # (B, H, N, dh)
        key, value = self.split_keys_values(projected)  # (B, N, C) each, raw
        q_tables, k_tables = tables if self.use_rotary else (None, None)
        q, scale = self.attn.prepare_queries(q, q_tables)

        # 2. add this call's keys and values to the block's (normalised and rotated once, here)
        cache = self._write(cache, self.attn.prepare_keys(key, k_tables), value, key)

        # 3. attend over what each query may see: memory, the block's earlier tokens, itself
        J, mask, bias, empty = self._visible(cache, P, N, x.device)
        dropout_p = self.attn.dropout if self.training else 0.0
        out = attend(
            q, cache.keys[:, :, :J], split_kv_heads(cache.values[:, :J], self.attn.kv_heads), mask,
            scale=scale, bias=bias, dropout_p=dropout_p, implementation=self.attn.implementation,
        )
        if empty is not None:
            out = out.masked_fill(empty, 0.0)  # nothing to see: read nothing (meliad)
        outs = [out.transpose(1, 2).reshape(B, N, Q)]

        # 4. reads of the recurrent states, with their keys prepared at the block's start
        for n, (read, i) in enumerate(zip(self.state_reads, self.reads)):
            begin = Q + 2 * C + n * Q
            outs.append(read(projected[..., begin : begin + Q], cache.read_keys[n], views[i]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (B, N, (1 + reads) * Q)
        return F.linear(out, self.to_out.weight), cache

    def _write(self, cache: LayerCache, keys: Tensor, values: Tensor, raw_keys: Tensor) -> LayerCache:
        """``cache`` with N new prepared keys (B, K, N, dh), values and raw keys (B, N, C): after its P slots when
        the rows share P, in slot M + P[b] of row b's block-sized buffers when each row has its own."""
        M, P, W = cache.memory_len, cache.filled, self.block_width
        if isinstance(P, Tensor):
            rows = torch.arange(P.shape[0], device=P.device)
            cache.keys[rows, :, M + P] = keys[:, :, 0].to(cache.keys.dtype)
            cache.values[rows, M + P] = values[:, 0].to(cache.values.dtype)
            cache.raw_keys[rows, P] = raw_keys[:, 0].to(cache.raw_keys.dtype)
            return cache._replace(filled=P + 1)
        N = values.shape[1]
        keys = _extend(cache.keys, M + P, keys, M + W, 2)
        values = _extend(cache.values, M + P, values, M + W, 1)
        raw_keys = _extend(cache.raw_keys, P, raw_keys, W, 1)
        return cache._replace(keys=keys, values=values, raw_keys=raw_keys, filled=P + N)

    def _visible(
        self, cache: LayerCache, P: int | Tensor, N: int, device: torch.device
    ) -> tuple[int, Tensor | None, Tensor | None, Tensor | None]:
        """(keys to attend over J, mask, T5 bias, rows that see nothing) for the N queries from block position P.

        Rows that share P: mask (N, J) or (B, 1, N, J), None for the plain causal case of one query; bias (H, N, J).
        Rows at their own P (one query each): every row attends over all M + block_width slots, the ones past its
        token masked: mask (B, 1, 1, J), bias (B, H, 1, J), empty (B, 1, 1, 1).
        """
        M = cache.memory_len
        if isinstance(P, Tensor):
            J = M + self.block_width
            rows = torch.arange(P.shape[0], device=P.device)
            seen = torch.arange(J, device=P.device) <= M + P[:, None]  # (B, J): memory and the block so far
            if cache.mask is not None:
                seen = seen & (cache.mask[P] if cache.mask.ndim == 2 else cache.mask[rows, 0, P])
            bias = None if cache.bias is None else cache.bias[:, P].transpose(0, 1)[:, :, None]
            empty = None
            if cache.empty is not None:
                empty = (cache.empty[P] if cache.empty.ndim == 2 else cache.empty[rows, 0, P])[:, None, None]
            return J, seen[:, None, None], bias, empty
        J = M + P + N
        mask = bias = empty = None
        if cache.mask is not None:
            mask = cache.mask[..., P : P + N, :J]  # (N, J) or (B, 1, N, J)
        elif N > 1:
            mask = torch.ones(N, J, dtype=torch.bool, device=device).tril(M + P)  # causal, after the memory
        if cache.bias is not None:
            bias = cache.bias[:, P : P + N, :J]  # (H, N, J)
        if cache.empty is not None:
            empty = cache.empty[..., P : P + N, :]
        return J, mask, bias, empty

    def visibility(
        self, M: int, P: int, N: int, valid: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Which keys [memory (M), block so far (P + N)] each of the N newest queries sees.

        Returns (mask (N, J) or (B, 1, N, J) bool, T5 bias (H, N, J) or None, rows with no visible key
        (..., N, 1) or None). Memory slots sit at block positions -M .. -1.
        """
        distance = torch.arange(P, P + N, device=device)[:, None] - torch.arange(-M, P + N, device=device)  # (N, J)
        if self.sliding_window:
            mask = (distance >= 1) & (distance <= self.block_width)  # meliad: exactly the W previous tokens
        else:
            mask = distance >= 0  # the reference: all of the memory, the causal prefix and the token itself
        if valid is not None:
            valid = F.pad(valid, (0, P + N), value=True)  # (B, J)
            mask = mask & valid[:, None, None, :]  # (B, 1, N, J)
        empty = None
        if self.sliding_window:
            # the first token of a document has no previous token: unmask its row, zero its output
            empty = ~mask.any(dim=-1, keepdim=True)
            mask = mask | empty
        bias = None if self.position_bias is None else self.position_bias(distance)
        return mask, bias, empty


class TransformerLayer(nn.Module):
    """Attention block and feed-forward, each added to the residual stream."""

    def __init__(self, config: BlockRecurrentConfig, layer: int):
        super().__init__()
        self.attn = AttentionBlock(config, layer)
        self.ff = FeedForward(config.dim, config.ff_inner_dim, config.ff_dropout, config.ff_activation)

    def open_block(
        self, memory: XLMemory | None, views: Sequence[StateView], rotary: RotaryXPos, token_by_token: bool = False
    ) -> LayerCache:
        return self.attn.open_block(memory, views, rotary, self.ff, token_by_token)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The attention's input projections of x (B, N, D) in one product, and the raw keys and values
        (B, N, kv_dim) among them."""
        projected = self.attn.project(x, self.attn.input_projection())
        return (projected, *self.attn.split_keys_values(projected))

    def forward(
        self, x: Tensor, cache: LayerCache, views: Sequence[StateView], tables: tuple[RotaryTables, RotaryTables] | None,
        projected: Tensor | None = None,
    ) -> tuple[Tensor, LayerCache]:
        """x: (B, N, D) -> (B, N, D), and the cache with the N tokens appended."""
        branch, cache = self.attn(x, cache, views, tables, projected)
        x = x + branch
        return x + self.ff(x, cache.ff_in), cache


# what the decoder does with a cache, besides feeding it tokens: read its block, give each row its own position,
# start some rows' next block. Nothing outside this module reads or writes a cache's fields.


def position(cache: LayerCache) -> int | Tensor:
    """Tokens of the block fed so far: an int when the rows share it, else a (B,) tensor."""
    return cache.filled


def block_keys(cache: LayerCache, rows: Tensor | None = None, length: int | None = None) -> tuple[Tensor, Tensor]:
    """The raw keys and values (B, P, kv_dim) of the block so far, what a commit stores; with ``rows`` (rows at
    their own positions), the first ``length`` tokens of those rows' blocks."""
    M = cache.memory_len
    if rows is None:
        P = cache.filled
        return cache.raw_keys[:, :P], cache.values[:, M : M + P]
    return cache.raw_keys[rows, :length], cache.values[rows, M : M + length]


def per_row(opened: LayerCache, block_width: int) -> LayerCache:
    """A block just opened (P = 0) as block-sized buffers in which each row keeps its own position: one shape
    for the whole decode. Zeros where nothing is written yet, so that slots no row sees never hold a NaN that a
    zero attention weight would still spread."""
    M, W = opened.memory_len, block_width
    B, K, _, dh = opened.keys.shape
    keys = opened.keys.new_zeros(B, K, M + W, dh)
    keys[:, :, :M] = opened.keys
    values = opened.values.new_zeros(B, M + W, opened.values.shape[-1])
    values[:, :M] = opened.values
    positions = torch.zeros(B, dtype=torch.long, device=keys.device)
    return opened._replace(keys=keys, values=values, raw_keys=torch.zeros_like(values[:, :W]), filled=positions,
                           read_keys=tuple(map(_standard, opened.read_keys)), mask=_standard(opened.mask),
                           empty=None if opened.empty is None else _standard(opened.empty))


def _standard(t: Tensor) -> Tensor:
    """A copy of ``t`` in the standard contiguous layout (size-1 axes included): the tensors of a decode whose
    rows keep their own positions keep one layout, so its compiled pass never recompiles for a new stride."""
    return t.clone(memory_format=torch.contiguous_format)


def place_block(cache: LayerCache, rows: Tensor, source: LayerCache) -> LayerCache:
    """``cache`` (rows at their own positions, buffers owned by the caller) with ``rows`` holding the block so far
    of ``source``, a cache of those rows that share a position P > 0. Keys are rotated by their position in
    the block, not by the memory's length, so they move between memories of different lengths unchanged."""
    M, S, P = cache.memory_len, source.memory_len, source.filled
    cache.keys[rows, :, M : M + P] = source.keys[:, :, S : S + P].to(cache.keys.dtype)
    cache.values[rows, M : M + P] = source.values[:, S : S + P].to(cache.values.dtype)
    cache.raw_keys[rows, :P] = source.raw_keys[:, :P].to(cache.raw_keys.dtype)
    cache.filled[rows] = P
    return cache


def reopen_rows(cache: LayerCache, rows: Tensor, opened: LayerCache) -> LayerCache:
    """``cache`` (rows at their own positions) with ``rows`` starting their next block: ``opened`` is that block
    opened for those rows on full-length memories. New tensors, the block's buffers included (the rows will write
    their new block into them): a decode state held from before keeps its own. The rows' old block slots stay,
    unseen (past their position) until overwritten."""
    M = cache.memory_len
    keys, values = cache.keys.clone(), cache.values.clone()
    keys[rows, :, :M] = opened.keys
    values[rows, :M] = opened.values
    return cache._replace(
        keys=keys, values=values, raw_keys=cache.raw_keys.clone(),
        mask=_standard(cache.mask).index_copy_(0, rows, opened.mask),
        empty=None if cache.empty is None else _standard(cache.empty).index_copy_(0, rows, opened.empty),
        read_keys=tuple(_standard(k).index_copy_(0, rows, new) for k, new in zip(cache.read_keys, opened.read_keys)),
        filled=cache.filled.index_fill(0, rows, 0),
    )


def select_rows(cache: LayerCache, rows: Tensor) -> LayerCache:
    """The cache of batch rows ``rows`` (an index tensor; a row may repeat, as beam search reorders its beams), on
    new tensors."""
    take = lambda t: None if t is None else t[rows]
    batched = lambda t: t if t is None or t.ndim < 4 else t[rows]  # masks without a batch axis are shared
    return cache._replace(
        keys=take(cache.keys), values=take(cache.values), raw_keys=take(cache.raw_keys),
        filled=cache.filled[rows] if isinstance(cache.filled, Tensor) else cache.filled,
        mask=batched(cache.mask), empty=batched(cache.empty), read_keys=tuple(k[rows] for k in cache.read_keys),
    )


def copy_buffers(cache: LayerCache) -> LayerCache:
    """``cache`` on copies of the buffers that feeding writes in place: for a decode state continued again
    after a newer one has written into the buffers they share."""
    copy = lambda t: None if t is None else t.clone()
    return cache._replace(keys=copy(cache.keys), values=copy(cache.values), raw_keys=copy(cache.raw_keys),
                          filled=copy(cache.filled) if isinstance(cache.filled, Tensor) else cache.filled)
