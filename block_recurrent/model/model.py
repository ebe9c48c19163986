"""The Block-Recurrent Transformer: a stack of pre-norm attention + feed-forward layers run block by block.

Each layer attends causally within its block and to its Transformer-XL memory of earlier blocks.
Recurrent layers also own a state cell: reading layers cross-attend to the state, and at the end of every
block the writing layer rewrites it. All carried tensors travel in a :class:`ModelState`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import BlockRecurrentConfig
from .layer import LayerCache, TransformerLayer, block_keys, position
from .positions import RotaryXPos
from .recurrent import DeltaStateCell, RecurrentStateCell, StateView
from .state import ModelState, XLMemory, checked_state
from .checks import check_reset, check_tokens


class BlockRecurrentModel(nn.Module):
    """Block-Recurrent Transformer language model, built from a :class:`BlockRecurrentConfig`.

    ``model(tokens, state, reset=...)`` (or ``model.run``) takes any number of tokens and returns
    ``(logits, ModelState)`` with the graph kept, for truncated back-propagation over several segments.
    The reference port's constructor keywords, tuple-returning ``forward`` and ``generate`` are in
    :class:`block_recurrent.reference.BlockRecurrentTransformer`, a subclass with the same weights.
    """

    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        if not isinstance(config, BlockRecurrentConfig):
            raise TypeError(f"config must be a BlockRecurrentConfig, got {type(config).__name__}")
        self.config = config

        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        # rotary frame: up to max_memory_len memory slots, then one block
        self.rotary = RotaryXPos(
            config.dim_head, config.max_memory_len, config.block_width, config.rotary_theta, config.xpos_scale_base
        )
        self.layers = nn.ModuleList([TransformerLayer(config, layer) for layer in range(1, config.depth + 1)])
        # whether whole blocks may run side by side (forward_blocks); set False to force block after block
        self.blocks_side_by_side = config.blocks_side_by_side
        self.norm_out = nn.LayerNorm(config.dim, bias=False)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_emb.weight.dtype

    @property
    def cells(self) -> list[RecurrentStateCell | DeltaStateCell]:
        """The state cells, in the order of ``config.recurrent_layers``."""
        return [self.layers[layer - 1].attn.cell for layer in self.config.recurrent_layers]

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters; with ``non_embedding``, only the layer stack's: without the token embedding,
        the final norm and the output projection, as the paper counts (meliad's 151,022,688 for 12 layers)."""
        if non_embedding:
            return sum(p.numel() for p in self.layers.parameters())
        return sum(p.numel() for p in self.parameters())

    def initial_states(self) -> tuple[Tensor, ...]:
        return tuple(cell.initial_state for cell in self.cells)

    def empty_state(self) -> ModelState:
        """The state of a fresh document: no memory, learned initial states."""
        return ModelState.empty(self.config)

    # a block is: open_block (what all its tokens share), forward_tokens (all of it at once, or piece by piece when
    # decoding), commit_block (memories advance, states are written): the one commit every caller uses

    def state_views(self, states: Sequence[Tensor | None], batch_size: int) -> tuple[StateView, ...]:
        """Each recurrent state as one block sees it (computed once: used by the reads and by the write)."""
        return tuple(cell.view(s, batch_size) for cell, s in zip(self.cells, states))

    def open_block(
        self, state: ModelState, batch_size: int, *, token_by_token: bool = False
    ) -> tuple[tuple[StateView, ...], tuple[LayerCache, ...]]:
        """What every token of the block that follows ``state`` shares: the state views and each layer's cache.
        ``token_by_token``: the block will be fed one token per call (decoding), so the caches keep contiguous
        copies of the input projections, which a vector multiplies faster; a whole block at once needs no copy."""
        views = self.state_views(state.states, batch_size)
        caches = tuple(
            layer.open_block(memory, views, self.rotary, token_by_token)
            for layer, memory in zip(self.layers, state.memories)
        )
        return views, caches

    def forward_tokens(
        self, x: Tensor, caches: Sequence[LayerCache], views: Sequence[StateView]
    ) -> tuple[Tensor, tuple[LayerCache, ...]]:
        """Run the next N embedded tokens x (B, N, D) of the current block through every layer; commit nothing.

        Returns (hidden (B, N, D), the per-layer caches with the N tokens appended).
        """
        tables = None  # the N tokens' rotary tables, the same in every layer
        if self.config.position_encoding == "rotary_xpos":
            tables = self.rotary.tables_at(position(caches[0]), x.shape[1])
        next_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cache, views, tables)
            next_caches.append(cache)
        return x, tuple(next_caches)

    def commit_block(
        self, state: ModelState, views: Sequence[StateView], blocks: Sequence[tuple[Tensor, Tensor]],
        *, advance_memories: bool = True, write: bool = True,
    ) -> ModelState:
        """The state after a block (complete or not) whose raw keys/values per layer are ``blocks``: memories
        advance by the block (unless ``advance_memories`` is False: they already hold it), and each writing layer
        rewrites its state from the view taken at the block's start and its own keys/values of the block (unless
        ``write`` is False: the states stay those the block read, for a caller that writes them later)."""
        memories = state.memories
        if advance_memories:
            memories = tuple(
                layer.attn.memory.update(memory, keys, values)
                for layer, memory, (keys, values) in zip(self.layers, state.memories, blocks)
            )
        if not write:
            return ModelState(memories, tuple(view.state for view in views))
        states = tuple(
            cell.write(view, *blocks[layer - 1])
            for cell, view, layer in zip(self.cells, views, self.config.recurrent_layers)
        )
        return ModelState(memories, states)

    def forward_block(self, x: Tensor, state: ModelState, *, write: bool = True) -> tuple[Tensor, ModelState]:
        """Run one block of embedded tokens x (B, N <= block_width, D) and commit it: (hidden, next state);
        ``write``: as in :meth:`commit_block`."""
        views, caches = self.open_block(state, x.shape[0])
        hidden, caches = self.forward_tokens(x, caches, views)
        return hidden, self.commit_block(state, views, tuple(block_keys(cache) for cache in caches), write=write)

    def forward_blocks(self, x: Tensor, state: ModelState, *, write_last: bool = True) -> tuple[Tensor, ModelState]:
        """Run n whole blocks of embedded tokens x (B, n * block_width, D) and commit them: the same as n calls of
        :meth:`forward_block`, with the n blocks side by side in one batch of B * n rows (``write_last``: the last
        block's ``write``).

        A layer's memory for block i is its own keys/values of block i - 1, known as soon as the layer's input
        is, so every layer runs once for all n blocks; only the recurrent states' writes go block after block
        (a few small products each). Needs ``blocks_side_by_side`` (FIFO memories, no state read below its writer).
        """
        if not self.blocks_side_by_side:
            raise ValueError("this config cannot run blocks side by side (compressed memory or a state read below "
                             "the layer that writes it); use forward_block")
        B, T, D = x.shape
        W = self.config.block_width
        if T == 0 or T % W:
            raise ValueError(f"forward_blocks takes whole blocks: x has {T} tokens, block_width={W}")
        if any(m is not None and m.length > W for m in state.memories):
            raise ValueError(f"forward_blocks takes memories of at most block_width={W} slots; use forward_block")
        n = T // W
        x = x.reshape(B * n, W, D)
        tables = None
        if self.config.position_encoding == "rotary_xpos":
            tables = self.rotary.tables_at(0, W)
        views: list[StateView | None] = [None] * len(self.cells)  # per state, the n blocks' views, (B * n, ...)
        last_views: list[StateView | None] = [None] * len(self.cells)  # per state, the last block's view
        last_blocks = []
        for number, (layer, memory) in enumerate(zip(self.layers, state.memories), start=1):
            projected, keys, values = layer.project(x)  # keys, values (B * n, W, kv_dim)
            keys, values = keys.reshape(B, n, W, -1), values.reshape(B, n, W, -1)
            if number in self.config.recurrent_layers:
                i = self.config.recurrent_layers.index(number)
                views[i], last_views[i] = _views_of_blocks(layer.attn.cell, state.states[i], keys, values)
            cache = layer.open_block(_previous_blocks(memory, keys, values), views, self.rotary)
            x, _ = layer(x, cache, views, tables, projected)
            last_blocks.append((keys[:, -1], values[:, -1]))
        # a FIFO memory of one block holds exactly the last block, whatever it held before
        return x.reshape(B, T, D), self.commit_block(state, last_views, last_blocks, write=write_last)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.token_emb(tokens)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.to_logits(self.norm_out(hidden))

    def forward(
        self, tokens: Tensor, state: ModelState | None = None, *, reset: Tensor | None = None
    ) -> tuple[Tensor, ModelState]:
        """``model(tokens, state, reset=...)``: the same as :meth:`run`."""
        return self.run(tokens, state, reset=reset)

    def run(
        self, tokens: Tensor, state: ModelState | None = None, *, reset: Tensor | None = None, write_last: bool = True
    ) -> tuple[Tensor, ModelState]:
        """Logits (B, T, num_tokens) for any number of tokens, processed block by block, and the next state.

        ``reset`` (B,) bool marks rows that start a new document: they get an empty memory and the learned
        initial state; the other rows carry on. The returned state keeps the autograd graph.
        ``write_last=False`` leaves out the last block's state write: the returned states are those that block
        read (its memories do advance), for a caller that redoes the write anyway (the trainer's replay).
        """
        check_tokens(tokens, self.config.num_tokens, "tokens")
        state = checked_state(self.config, state, tokens.shape[0])
        if reset is not None:
            check_reset(reset, tokens.shape[0])
            state = state.reset_rows(reset.to(tokens.device), self.initial_states())
        x = self.embed(tokens)  # (B, T, D)
        hidden, W = [], self.config.block_width
        whole = x.shape[1] // W * W
        # a state cell's scaled parameters (state_cell_scale) computed once for all of the call's blocks
        with parametrize.cached():
            if self.blocks_side_by_side and whole >= 2 * W:  # (a checked state's memories hold at most a block)
                block, state = self.forward_blocks(x[:, :whole], state, write_last=write_last or whole < x.shape[1])
                hidden.append(block)
                x = x[:, whole:]
            pieces = x.split(W, dim=1) if x.shape[1] else ()
            for index, block in enumerate(pieces):
                block, state = self.forward_block(block, state, write=write_last or index + 1 < len(pieces))
                hidden.append(block)
        return self.logits(torch.cat(hidden, dim=1)), state

    def loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of logits (B, T, V) against labels (B, T), skipping ``ignore_index``."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax of a large vocabulary needs more than half precision
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=self.config.ignore_index,
            reduction=reduction,
        )

def _previous_blocks(memory: XLMemory | None, keys: Tensor, values: Tensor) -> XLMemory:
    """The memory of each of n blocks side by side, (B * n, W, kv_dim): the carried ``memory`` (at most W slots of
    the previous block, front-padded with invalid slots) for block 0, block i - 1's keys/values (B, n, W, kv_dim)
    for block i."""
    B, n, W, C = keys.shape
    M = 0 if memory is None else memory.length
    first_keys, first_values = keys.new_zeros(B, 1, W - M, C), values.new_zeros(B, 1, W - M, C)
    if memory is not None:
        first_keys = torch.cat((first_keys, memory.keys.to(keys.dtype)[:, None]), dim=2)
        first_values = torch.cat((first_values, memory.values.to(values.dtype)[:, None]), dim=2)
    valid = None
    if M < W or memory.valid is not None:  # some slot of block 0's memory is empty or from another document
        first_valid = torch.zeros(B, W, dtype=torch.bool, device=keys.device)
        first_valid[:, W - M :] = True if memory is None or memory.valid is None else memory.valid
        valid = F.pad(first_valid, (0, (n - 1) * W), value=True).view(B * n, W)
    keys = torch.cat((first_keys, keys[:, :-1]), dim=1).view(B * n, W, C)
    values = torch.cat((first_values, values[:, :-1]), dim=1).view(B * n, W, C)
    return XLMemory(keys, values, valid)


def _views_of_blocks(
    cell: RecurrentStateCell | DeltaStateCell, state: Tensor | None, keys: Tensor, values: Tensor
) -> tuple[StateView, StateView]:
    """A state's views for n blocks side by side, stacked to (B * n, ...), and the last block's view, from the
    writing layer's raw keys/values (B, n, W, kv_dim): the state is written after each block but the last (whose
    write is the commit's)."""
    B, n, W, C = keys.shape
    prepared = cell.prepare_block_keys(keys[:, :-1].reshape(B, (n - 1) * W, C))  # every write's keys in one call
    views = [cell.view(state, B)]
    for i in range(n - 1):
        written = cell.write(views[-1], keys[:, i], values[:, i], prepared[:, :, i * W : (i + 1) * W])
        views.append(cell.view(written, B))
    return StateView(*(torch.stack(parts, dim=1).flatten(0, 1) for parts in zip(*views))), views[-1]
