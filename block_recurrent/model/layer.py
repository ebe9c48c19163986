"""One layer of the stack: self-attention over [XL memory, block so far] plus reads of recurrent states,
then a feed-forward, for any number of new tokens of the current block.

The same call serves every caller. Training runs a whole block at once (N = block_width), prefill the rest
of a block, decoding one token (N = 1). What a layer needs for the current block is a :class:`LayerCache`,
built once when the block starts (:meth:`AttentionBlock.open_block`): the memory's keys already normalised
and rotated, the state reads' keys, which key each query may see, and the projection weights side by side.
Each call appends its tokens' keys/values to the cache and returns the new cache, never changing the old one
in a way its holder could see, so two continuations of one decode state are both exact.
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
from .recurrent import RecurrentStateCell, StateRead, StateView
from .state import XLMemory


class LayerCache(NamedTuple):
    """One layer's attention inputs for the current block.

    Keys and values along the key axis are [memory (M slots), block so far (P slots)]. Under autograd they are
    exactly that long and a call concatenates; without autograd they live in buffers of M + block_width slots
    that a call writes in place (one slot per token when decoding, instead of re-concatenating the block). Several
    caches may share those buffers: each uses only its own first M + P slots, and ``written`` (the one mutable
    part, shared) says how far any of them has written, so a call from an older cache copies before writing.
    """

    keys: Tensor | None  # (B, kv_heads, >= M + P, dh): normalised (qk-norm layers) and rotated (rotary) keys
    values: Tensor | None  # (B, >= M + P, kv_dim): raw values (values are never transformed)
    raw_keys: Tensor | None  # (B, >= P, kv_dim): the block's keys as projected, which the commit stores
    memory_len: int  # M
    # P: tokens of the block fed so far; a (B,) tensor when rows stand at different positions (ragged decoding:
    # one token per row per call, written in place in buffers of M + block_width slots)
    filled: int | Tensor
    written: list  # [slots of the block written by any cache sharing these buffers]
    # which keys each of the block's W positions sees, from AttentionBlock.visibility: mask (W, M + W) or
    # (B, 1, W, M + W) bool (None: every key so far, the plain causal case), T5 bias (H, W, M + W) or None,
    # and the rows that see nothing (sliding window at a document's first token), (W, 1) or (B, 1, W, 1)
    mask: Tensor | None
    bias: Tensor | None
    empty: Tensor | None
    read_keys: tuple[Tensor, ...]  # per state read, the state's keys prepared once for the block
    # the layer's input projections side by side and transposed, (D, H dh + 2 kv_dim + reads * H dh): one matrix
    # product per call for queries, keys, values and state-read queries; and the feed-forward's input projection,
    # transposed. Contiguous copies when decoding (a vector times a contiguous (D, out) matrix was 1.2-3x faster
    # on the CPU than F.linear) when the block is decoded token by token, views otherwise
    in_proj: Tensor
    ff_in: Tensor

    def block_keys(self) -> tuple[Tensor, Tensor]:
        """The block's raw keys and values so far, (B, P, kv_dim) each: what a commit stores."""
        M, P = self.memory_len, self.filled
        return self.raw_keys[:, :P], self.values[:, M : M + P]


def _must_copy(buffer: Tensor, cache: LayerCache) -> bool:
    """Whether writing past ``cache``'s slots in place could change what another cache or autograd sees."""
    return (
        cache.written[0] > cache.filled  # another continuation of an older cache has written here
        or (buffer.is_inference() and not torch.is_inference_mode_enabled())  # cannot be written outside it
    )


def _append(buffer: Tensor | None, length: int, new: Tensor, capacity: int, axis: int, mode: str) -> Tensor:
    """``buffer``'s first ``length`` slots along ``axis`` followed by ``new``.

    mode "concat": a new tensor of exactly that length (autograd). "write": ``new`` is written in place into a
    buffer of ``capacity`` slots (allocated when there is none of that size). "copy": as "write", on a copy.
    """
    if mode == "concat":
        return new if buffer is None or length == 0 else torch.cat((buffer.narrow(axis, 0, length), new), dim=axis)
    if buffer is None or buffer.shape[axis] != capacity:
        shape = list(new.shape)
        shape[axis] = capacity
        fresh = new.new_empty(shape)
        if buffer is not None and length:
            fresh.narrow(axis, 0, length).copy_(buffer.narrow(axis, 0, length))
        buffer = fresh
    elif mode == "copy":
        buffer = buffer.clone()
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
        self.cell = RecurrentStateCell(config) if self.is_recurrent else None

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
        return LayerCache(keys, values, None, M, 0, [0], mask, bias, empty, read_keys, in_proj, ff_in)

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
        M, P = cache.memory_len, cache.filled
        ragged = isinstance(P, Tensor)
        if ragged and N != 1:
            raise ValueError(f"rows at different positions take one token each, got {N}")
        if not ragged and P + N > self.block_width:
            raise ValueError(f"{N} tokens do not fit in the block: {P} of block_width={self.block_width} are fed")

        # 1. one product for queries, keys, values and the state reads' queries
        if projected is None:
            projected = self.project(x, cache.in_proj)
        q = projected[..., :Q].view(B, N, H, dh).transpose(1, 2)  # (B, H, N, dh)
        key, value = self.split_keys_values(projected)  # (B, N, C) each, raw
        q_tables, k_tables = tables if self.use_rotary else (None, None)
        q, scale = self.attn.prepare_queries(q, q_tables)

        # 2. append this call's keys and values to the block's (normalised and rotated once, here)
        new_keys = self.attn.prepare_keys(key, k_tables)
        cache = self._write_rows(cache, new_keys, value, key) if ragged else self._append(cache, new_keys, value, key)

        # 3. attend over what each query may see: memory, the block's earlier tokens, itself
        if ragged:
            mask, bias, empty = self._ragged_visibility(cache, P)
            J = M + self.block_width
        else:
            J = M + P + N
            mask = bias = empty = None
            if cache.mask is not None:
                mask = cache.mask[..., P : P + N, :J]  # (N, J) or (B, 1, N, J)
            elif N > 1:
                mask = torch.ones(N, J, dtype=torch.bool, device=x.device).tril(M + P)  # causal, after the memory
            if cache.bias is not None:
                bias = cache.bias[:, P : P + N, :J]  # (H, N, J)
            if cache.empty is not None:
                empty = cache.empty[..., P : P + N, :]
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

    def _append(self, cache: LayerCache, keys: Tensor, values: Tensor, raw_keys: Tensor) -> LayerCache:
        """``cache`` with N new prepared keys (B, K, N, dh), values and raw keys (B, N, C) after its slots."""
        M, P, W = cache.memory_len, cache.filled, self.block_width
        N = values.shape[1]
        written = cache.written
        if torch.is_grad_enabled():
            mode = "concat"  # autograd may keep views of the old tensors: never write into them
        elif cache.keys is not None and _must_copy(cache.keys, cache):
            mode, written = "copy", [0]
        else:
            mode = "write"
        keys = _append(cache.keys, M + P, keys, M + W, 2, mode)
        values = _append(cache.values, M + P, values, M + W, 1, mode)
        raw_keys = _append(cache.raw_keys, P, raw_keys, W, 1, mode)
        written[0] = max(written[0], P + N)
        return cache._replace(keys=keys, values=values, raw_keys=raw_keys, filled=P + N, written=written)

    def _write_rows(self, cache: LayerCache, keys: Tensor, values: Tensor, raw_keys: Tensor) -> LayerCache:
        """Ragged decoding: row b's new key/value (keys (B, K, 1, dh), values and raw keys (B, 1, C)) into slot
        M + P[b] of the block-sized buffers, in place (a ragged cache is owned by one decoding loop)."""
        M, P = cache.memory_len, cache.filled
        rows = torch.arange(P.shape[0], device=P.device)
        cache.keys[rows, :, M + P] = keys[:, :, 0].to(cache.keys.dtype)
        cache.values[rows, M + P] = values[:, 0].to(cache.values.dtype)
        cache.raw_keys[rows, P] = raw_keys[:, 0].to(cache.raw_keys.dtype)
        return cache._replace(filled=P + 1)

    def _ragged_visibility(self, cache: LayerCache, P: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Row b's query at block position P[b] over all M + block_width slots: (mask (B, 1, 1, J), bias
        (B, H, 1, J) or None, empty (B, 1, 1, 1) or None). Slots past each row's token are never visible."""
        M, W = cache.memory_len, self.block_width
        rows = torch.arange(P.shape[0], device=P.device)
        seen = torch.arange(M + W, device=P.device) <= M + P[:, None]  # (B, J): memory and the block so far
        if cache.mask is not None:
            rule = cache.mask[P] if cache.mask.ndim == 2 else cache.mask[rows, 0, P]  # (B, J)
            seen = seen & rule
        bias = None if cache.bias is None else cache.bias[:, P].transpose(0, 1)[:, :, None]  # (B, H, 1, J)
        empty = None
        if cache.empty is not None:
            empty = (cache.empty[P] if cache.empty.ndim == 2 else cache.empty[rows, 0, P])[:, None, None]  # (B, 1, 1, 1)
        return seen[:, None, None], bias, empty

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

    @staticmethod
    def block_keys(cache: LayerCache) -> tuple[Tensor, Tensor]:
        """The raw keys and values (B, P, kv_dim) of the block so far: what a commit stores."""
        return cache.block_keys()

    @staticmethod
    def position(cache: LayerCache) -> int | Tensor:
        """Tokens of the block fed so far: an int, or a (B,) tensor when rows stand at different positions."""
        return cache.filled

    def forward(
        self, x: Tensor, cache: LayerCache, views: Sequence[StateView], tables: tuple[RotaryTables, RotaryTables] | None,
        projected: Tensor | None = None,
    ) -> tuple[Tensor, LayerCache]:
        """x: (B, N, D) -> (B, N, D), and the cache with the N tokens appended."""
        branch, cache = self.attn(x, cache, views, tables, projected)
        x = x + branch
        return x + self.ff(x, cache.ff_in), cache
