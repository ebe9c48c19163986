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

from .config import BlockRecurrentConfig
from .generation import generate_reference
from .layer import LayerCache, TransformerLayer
from .positions import RotaryXPos
from .recurrent import RecurrentStateCell, StateView
from .state import ModelState, XLMemory, checked_state, state_from_reference
from .checks import check_labels, check_reset, check_tokens


class BlockRecurrentTransformer(nn.Module):
    """Block-Recurrent Transformer language model.

    Build it like the reference port, ``BlockRecurrentTransformer(num_tokens=256, dim=512, depth=6, ...)``,
    or from a config: ``BlockRecurrentTransformer(BlockRecurrentConfig(...))``.

    Two ways to run it:
    - ``forward(x, return_loss, xl_memories, states, return_memories_and_states)``: the reference's call,
      for up to ``max_seq_len`` tokens; returns ``(logits or loss, memories, states)``, detached.
    - ``run(tokens, state, reset=...)``: any number of tokens, returns ``(logits, ModelState)`` with the
      graph kept, for truncated back-propagation over several segments.
    """

    def __init__(self, config: BlockRecurrentConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = BlockRecurrentConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a config or keyword arguments, not both (got {sorted(kwargs)})")
        elif not isinstance(config, BlockRecurrentConfig):
            raise TypeError(f"config must be a BlockRecurrentConfig, got {type(config).__name__}")
        self.config = config

        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        # rotary frame: up to max_memory_len memory slots, then one block
        self.rotary = RotaryXPos(
            config.dim_head, config.max_memory_len, config.block_width, config.rotary_theta, config.xpos_scale_base
        )
        self.layers = nn.ModuleList([TransformerLayer(config, layer) for layer in range(1, config.depth + 1)])
        self.parallel_blocks = config.blocks_side_by_side  # forward_blocks allowed; False forces block by block
        self.norm_out = nn.LayerNorm(config.dim, bias=False)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)

    # reference-compatible attributes
    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def block_width(self) -> int:
        return self.config.block_width

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return self.config.recurrent_layers

    @property
    def read_recurrent_layers(self) -> tuple[int, ...]:
        return self.config.read_recurrent_layers

    @property
    def ignore_index(self) -> int:
        return self.config.ignore_index

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_emb.weight.dtype

    @property
    def cells(self) -> list[RecurrentStateCell]:
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

    # core: explicit state in, next state out. A block is start_block, forward_tokens (all of it at once, or
    # piece by piece when decoding), commit_block

    def start_block(
        self, state: ModelState, batch_size: int, *, token_by_token: bool = False
    ) -> tuple[tuple[StateView, ...], tuple[LayerCache, ...]]:
        """What every token of the block that follows ``state`` shares: each recurrent state's view (computed
        once, used by the reads and by the write at the block's end) and each layer's cache. ``token_by_token``:
        the block will be fed one token per call (decoding), so the caches keep contiguous copies of the input
        projections, which a vector multiplies faster; a whole block at once needs no copy."""
        views = tuple(cell.view(s, batch_size) for cell, s in zip(self.cells, state.states))
        caches = tuple(
            layer.start_block(memory, views, self.rotary, token_by_token)
            for layer, memory in zip(self.layers, state.memories)
        )
        return views, caches

    def forward_tokens(
        self, x: Tensor, caches: Sequence[LayerCache], views: Sequence[StateView]
    ) -> tuple[Tensor, tuple[LayerCache, ...]]:
        """Run the next N embedded tokens x (B, N, D) of the current block through every layer; commit nothing.

        Returns (hidden (B, N, D), the per-layer caches with the N tokens appended).
        """
        P, N = caches[0].filled, x.shape[1]
        tables = None  # the N tokens' rotary tables, the same in every layer
        if self.config.position_encoding == "rotary_xpos" and isinstance(P, Tensor):
            tables = self.rotary.queries_at(P), self.rotary.keys_at(P)  # ragged: one token per row at its position
        elif self.config.position_encoding == "rotary_xpos":
            tables = self.rotary.queries(P, P + N), self.rotary.keys(P, P + N)
        next_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cache, views, tables)
            next_caches.append(cache)
        return x, tuple(next_caches)

    def commit_block(
        self, state: ModelState, views: Sequence[StateView], caches: Sequence[LayerCache]
    ) -> ModelState:
        """The state after the block held by ``caches`` (complete or not): memories advance, and writing
        layers rewrite their state from the views taken at the block's start and the block's keys/values."""
        blocks = [cache.block_keys() for cache in caches]  # per layer, (keys, values) (B, P, kv_dim)
        memories = tuple(
            layer.attn.memory.update(memory, keys, values)
            for layer, memory, (keys, values) in zip(self.layers, state.memories, blocks)
        )
        states = list(state.states)
        for i, (cell, layer) in enumerate(zip(self.cells, self.config.recurrent_layers)):
            states[i] = cell.write(views[i], *blocks[layer - 1])
        return ModelState(memories, tuple(states))

    def forward_block(self, x: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Run one block of embedded tokens x (B, N <= block_width, D) and commit it: (hidden, next state)."""
        views, caches = self.start_block(state, x.shape[0])
        hidden, caches = self.forward_tokens(x, caches, views)
        return hidden, self.commit_block(state, views, caches)

    def forward_blocks(self, x: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Run n whole blocks of embedded tokens x (B, n * block_width, D) and commit them: the same as n calls of
        :meth:`forward_block`, with the n blocks side by side in one batch of B * n rows.

        A layer's memory for block i is its own keys/values of block i - 1, known as soon as the layer's input
        is, so every layer runs once for all n blocks; only the recurrent states' writes go block after block
        (a few small products each). Needs ``parallel_blocks`` (FIFO memories, no state read below its writer).
        """
        if not self.parallel_blocks:
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
            tables = self.rotary.queries(0, W), self.rotary.keys(0, W)
        views: list[StateView | None] = [None] * len(self.cells)
        memories, states = [], list(state.states)
        for number, (layer, memory) in enumerate(zip(self.layers, state.memories), start=1):
            attn = layer.attn
            projected = attn.project(x, attn.input_projection())
            keys, values = (t.reshape(B, n, W, -1) for t in attn.split_keys_values(projected))
            if attn.is_recurrent:
                i = self.config.recurrent_layers.index(number)
                views[i], states[i] = _write_blocks(attn.cell, states[i], keys, values)
            cache = layer.start_block(_previous_blocks(memory, keys, values), views, self.rotary)
            x, _ = layer(x, cache, views, tables, projected)
            memories.append(attn.memory.update(memory, keys[:, -1], values[:, -1]))
        return x.reshape(B, T, D), ModelState(tuple(memories), tuple(states))

    def embed(self, tokens: Tensor) -> Tensor:
        return self.token_emb(tokens)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.to_logits(self.norm_out(hidden))

    def run(
        self, tokens: Tensor, state: ModelState | None = None, *, reset: Tensor | None = None
    ) -> tuple[Tensor, ModelState]:
        """Logits (B, T, num_tokens) for any number of tokens, processed block by block, and the next state.

        ``reset`` (B,) bool marks rows that start a new document: they get an empty memory and the learned
        initial state; the other rows carry on. The returned state keeps the autograd graph.
        """
        check_tokens(tokens, self.config.num_tokens, "tokens")
        state = checked_state(self.config, state, tokens.shape[0])
        if reset is not None:
            check_reset(reset, tokens.shape[0])
        return self._run(tokens, state, reset)

    def _run(self, tokens: Tensor, state: ModelState, reset: Tensor | None) -> tuple[Tensor, ModelState]:
        if reset is not None:
            state = state.reset_rows(reset.to(tokens.device), self.initial_states())
        x = self.embed(tokens)  # (B, T, D)
        hidden, W = [], self.config.block_width
        whole = x.shape[1] // W * W
        if self.parallel_blocks and whole >= 2 * W:  # (a checked state's memories hold at most a block)
            block, state = self.forward_blocks(x[:, :whole], state)
            hidden.append(block)
            x = x[:, whole:]
        for block in x.split(W, dim=1) if x.shape[1] else ():
            block, state = self.forward_block(block, state)
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

    # the reference's interface

    def forward(
        self,
        x: Tensor,
        return_loss: bool = False,
        xl_memories: Sequence[XLMemory | Tensor | None] | None = None,
        states: Sequence[Tensor | None] | None = None,
        return_memories_and_states: bool | None = None,
        *,
        labels: Tensor | None = None,
        reset: Tensor | None = None,
    ):
        """The reference's call: ``out, memories, states = model(x, ...)``.

        x: (B, T) token ids, T <= max_seq_len (T <= max_seq_len + 1 with ``return_loss``, where the last
        token is only a label). With ``labels`` (B, T) given, x is all input and ``labels`` the targets
        (``ignore_index`` allowed). ``xl_memories``/``states``: what a previous call returned (empty or
        None for a fresh start; the reference's (2, B, M, dh) memory tensors are accepted too).
        Memories and states are returned (detached) when ``return_memories_and_states`` is True, or by
        default when T == max_seq_len; otherwise None.
        """
        check_tokens(x, self.config.num_tokens)
        if labels is not None:
            check_labels(labels, x.shape, self.config.num_tokens, self.config.ignore_index)
            return_loss = True
        elif return_loss:
            if x.shape[1] < 2:
                raise ValueError("return_loss needs at least 2 tokens per row (inputs and their next-token labels)")
            x, labels = x[:, :-1], x[:, 1:]
        T = x.shape[1]
        if T > self.config.max_seq_len:
            extra = " (+1 label token with return_loss)" if return_loss else ""
            raise ValueError(
                f"x has {T} tokens per row; forward takes at most max_seq_len={self.config.max_seq_len}{extra}. "
                "Use RecurrentTrainerWrapper or model.run for longer sequences"
            )

        state = state_from_reference(self.config, xl_memories, states, x.shape[0])
        if reset is not None:
            check_reset(reset, x.shape[0])
        logits, next_state = self._run(x, state, reset)

        if return_memories_and_states is None:
            return_memories_and_states = T == self.config.max_seq_len
        memories_out = states_out = None
        if return_memories_and_states:
            next_state = next_state.detach()
            memories_out, states_out = list(next_state.memories), list(next_state.states)

        if not return_loss:
            return logits, memories_out, states_out
        return self.loss(logits, labels), memories_out, states_out

    @torch.no_grad()
    def generate(
        self,
        prime: Tensor,
        length: int | None = None,
        xl_memories: Sequence[XLMemory | Tensor | None] = (),
        states: Sequence[Tensor | None] = (),
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        return_memories_and_states: bool = False,
    ):
        """The reference's ``generate``: the ``length - prime_len`` tokens (B, new) that follow ``prime`` (B, T).

        ``length`` counts the prime (default max_seq_len + 1) and, unlike the reference, may exceed
        max_seq_len + 1; the prime may be of any length. Runs on the exact cache of
        :mod:`block_recurrent.generation` (see ``generate_reference`` there for the returned memories/states).
        """
        return generate_reference(
            self, prime, length, xl_memories, states, temperature, filter_thres, return_memories_and_states
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


def _write_blocks(
    cell: RecurrentStateCell, state: Tensor | None, keys: Tensor, values: Tensor
) -> tuple[StateView, Tensor]:
    """A state's views for n blocks side by side, stacked to (B * n, ...), and the state after the last block,
    from the writing layer's raw keys/values (B, n, W, kv_dim): the state is rewritten block after block."""
    B, n = keys.shape[:2]
    views = []
    for i in range(n):
        view = cell.view(state, B)
        state = cell.write(view, keys[:, i], values[:, i])
        views.append(view)
    return StateView(*(torch.stack(parts, dim=1).flatten(0, 1) for parts in zip(*views))), state
