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

from .attention import Attention, FeedForward, merge_heads, split_heads
from .config import BlockRecurrentConfig
from .memory import build_memory
from .positions import RotaryTables, RotaryXPos, T5RelativeBias
from .recurrent import RecurrentStateCell, StateRead, StateView
from .state import ModelState, XLMemory, checked_state, state_from_reference
from .checks import check_labels, check_reset, check_tokens


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over [XL memory, block so far], plus reads of recurrent states.

    Returns the branch output (added to the residual by the caller) and the block's raw keys/values, which
    the caller commits to the memory and, on a recurrent layer, to the state when the block ends.
    """

    def __init__(self, config: BlockRecurrentConfig, layer: int):
        super().__init__()
        dim, heads, dim_head = config.dim, config.heads, config.dim_head
        inner = heads * dim_head
        self.heads = heads
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

    def forward(
        self,
        x: Tensor,
        memory: XLMemory | None,
        rotary: RotaryXPos,
        views: Sequence[StateView] = (),
        prefix: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, N, D), the block's next N tokens; views: every recurrent state's view for this block;
        prefix: raw keys/values (B, P, kv_dim) of the block's earlier tokens (kv_dim = kv_heads * dim_head).

        Returns (branch output (B, N, D), block keys (B, P + N, kv_dim), block values (B, P + N, kv_dim)).
        """
        B, N, _ = x.shape
        normed = self.norm(x)
        q = split_heads(self.to_q(normed), self.heads)  # (B, H, N, dh)
        keys, values = self.to_kv(normed).chunk(2, dim=-1)  # (B, N, kv_dim) each
        if prefix is not None:
            keys, values = torch.cat((prefix[0], keys), dim=1), torch.cat((prefix[1], values), dim=1)
        block_keys, block_values = keys, values
        P = keys.shape[1] - N

        M = 0
        if memory is not None:
            M = memory.length
            keys, values = torch.cat((memory.keys, keys), dim=1), torch.cat((memory.values, values), dim=1)
        mask, bias, empty = self.visibility(M, P, N, None if memory is None else memory.valid, x.device)
        out = self.attn(q, keys, values, mask, self.rotary_tables(rotary, M, P, N), bias)  # (B, H, N, dh)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)  # a query with nothing to attend to reads nothing (meliad)
        out = merge_heads(out)  # (B, N, H * dh)

        out = torch.cat((out, *self.read_states(normed, views)), dim=-1)
        return self.to_out(out), block_keys, block_values

    def read_states(self, normed: Tensor, views: Sequence[StateView]) -> list[Tensor]:
        """This layer's reads of the recurrent states: one (B, N, H * dh) tensor per read."""
        return [read(normed, views[i]) for read, i in zip(self.state_reads, self.reads)]


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

    def rotary_tables(self, rotary: RotaryXPos, M: int, P: int, N: int) -> tuple[RotaryTables, RotaryTables] | None:
        """Rotary tables of the N newest queries and the M + P + N keys (None with T5 positions).

        The block's tokens sit in the frame's last block_width slots, the memory just before them.
        """
        if not self.use_rotary:
            return None
        base = rotary.width - self.block_width
        return rotary.queries(base + P, base + P + N), rotary.keys(base - M, base + P + N)


class Layer(nn.Module):
    def __init__(self, config: BlockRecurrentConfig, layer: int):
        super().__init__()
        self.attn = AttentionBlock(config, layer)
        self.ff = FeedForward(config.dim, config.ff_inner_dim, config.ff_dropout, config.ff_activation)


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
        # frame: up to max_memory_len memory slots, then one block
        width = config.max_memory_len + config.block_width
        self.rotary = RotaryXPos(config.dim_head, width, config.rotary_theta, config.xpos_scale_base)
        self.layers = nn.ModuleList([Layer(config, layer) for layer in range(1, config.depth + 1)])
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

    # core: explicit state in, next state out

    def state_views(self, state: ModelState, batch_size: int) -> tuple[StateView, ...]:
        """Each recurrent state as seen during one block (computed once at the block's start)."""
        return tuple(cell.view(s, batch_size) for cell, s in zip(self.cells, state.states))

    def forward_tokens(
        self,
        x: Tensor,
        memories: Sequence[XLMemory | None],
        views: Sequence[StateView],
        prefix: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Run the next N tokens x (B, N, D) of the current block through every layer; commit nothing.

        prefix: per layer, the raw keys/values (B, P, kv_dim) of the block's earlier tokens (None: the block
        starts here). Returns (hidden (B, N, D), per-layer block keys and values (B, P + N, kv_dim)).
        """
        keys, values = [], []
        for index, layer in enumerate(self.layers):
            layer_prefix = None if prefix is None else prefix[index]
            branch, layer_keys, layer_values = layer.attn(x, memories[index], self.rotary, views, layer_prefix)
            x = x + branch
            x = x + layer.ff(x)
            keys.append(layer_keys)
            values.append(layer_values)
        return x, tuple(keys), tuple(values)

    def commit_block(
        self, state: ModelState, views: Sequence[StateView], keys: Sequence[Tensor], values: Sequence[Tensor]
    ) -> ModelState:
        """The state after a block whose per-layer raw keys/values are given: memories advance, writing
        layers rewrite their state from the views taken at the block's start."""
        memories = tuple(
            layer.attn.memory.update(memory, k, v)
            for layer, memory, k, v in zip(self.layers, state.memories, keys, values)
        )
        cells, states = self.cells, list(state.states)
        for i, layer in enumerate(self.config.recurrent_layers):
            states[i] = cells[i].write(views[i], keys[layer - 1], values[layer - 1])
        return ModelState(memories, tuple(states))

    def forward_block(self, x: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Run one block of embedded tokens x (B, N <= block_width, D) and commit it: (hidden, next state)."""
        views = self.state_views(state, x.shape[0])
        hidden, keys, values = self.forward_tokens(x, state.memories, views)
        return hidden, self.commit_block(state, views, keys, values)

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
        x = self.token_emb(tokens)  # (B, T, D)
        hidden = []
        for block in x.split(self.config.block_width, dim=1):
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
        from .generation import generate_reference  # generation imports this module

        return generate_reference(
            self, prime, length, xl_memories, states, temperature, filter_thres, return_memories_and_states
        )
