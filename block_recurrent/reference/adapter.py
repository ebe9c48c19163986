"""The reference port's interface (block-recurrent-transformer-pytorch 0.4.4) on top of the core.

- :class:`BlockRecurrentTransformer`: the core model with the reference's constructor keywords, its
  ``forward`` returning ``(logits or loss, memories, states)`` and its ``generate``.
- :class:`RecurrentTrainerWrapper`: the segment runner with the reference's ``forward`` flag and ``generate``.
- The reference's state layout: memories as (2, B, M, dim_head) tensors, states as lists.

The core never imports this module; it translates the reference's calls into the core's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..inference.decoding import eval_no_grad
from ..inference.generation import commit_partial, generate
from ..model.checks import check_float, check_int, check_labels, check_tokens
from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel
from ..model.state import ModelState, XLMemory, checked_state
from ..training.segments import SegmentRunner


# the reference's state layout


def memory_to_reference(memory: XLMemory) -> Tensor:
    """The reference's layout of a memory: a (2, B, M, dim_head) tensor of stacked keys and values."""
    return torch.stack((memory.keys, memory.values))


def memory_from_reference(memory: Tensor, layer: int = 0) -> XLMemory:
    """An :class:`XLMemory` from the reference's (2, B, M, dim_head) tensor."""
    if memory.ndim != 4 or memory.shape[0] != 2:
        raise ValueError(
            f"xl_memories[{layer}] must be an XLMemory or a (2, batch, length, dim_head) tensor, "
            f"got shape {tuple(memory.shape)}"
        )
    return XLMemory(memory[0], memory[1])


def state_from_reference(
    config: BlockRecurrentConfig, xl_memories: Sequence | None, states: Sequence | None, batch_size: int
) -> ModelState:
    """The reference's (xl_memories, states) lists as a checked ModelState; empty or None means fresh."""

    def fill(items, count):
        if items is None:
            return (None,) * count
        if isinstance(items, Tensor) or not isinstance(items, Sequence):
            return items  # refused with a clear message by checked_state
        return tuple(items) if len(items) else (None,) * count

    memories = fill(xl_memories, config.depth)
    if isinstance(memories, tuple):
        memories = tuple(
            memory_from_reference(m, i) if isinstance(m, Tensor) else m for i, m in enumerate(memories)
        )
    state = ModelState(memories, fill(states, len(config.recurrent_layers)))
    return checked_state(config, state, batch_size)


class BlockRecurrentTransformer(BlockRecurrentModel):
    """Block-Recurrent Transformer language model, built like the reference port or from a config.

    ``BlockRecurrentTransformer(num_tokens=256, dim=512, depth=6, ...)`` or
    ``BlockRecurrentTransformer(BlockRecurrentConfig(...))``. Two ways to run it:

    - ``model(x, return_loss, xl_memories, states, return_memories_and_states)``: the reference's call, for up to
      ``max_seq_len`` tokens; returns ``(logits or loss, memories, states)``, detached.
    - ``model.run(tokens, state, reset=...)``: the core's call (:class:`BlockRecurrentModel`), any number of
      tokens, returns ``(logits, ModelState)`` with the graph kept.
    """

    def __init__(self, config: BlockRecurrentConfig | None = None, **kwargs):
        if config is None:
            config = BlockRecurrentConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a config or keyword arguments, not both (got {sorted(kwargs)})")
        super().__init__(config)

    # the reference's attributes

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
        logits, next_state = self.run(x, state, reset=reset)

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
        """The reference's ``generate``, on the exact cache and without its length limits: the
        ``length - prime_len`` tokens (B, new) that follow ``prime`` (B, T).

        ``length`` counts the prime (default max_seq_len + 1) and may exceed max_seq_len + 1; the prime may be of
        any length. ``filter_thres`` keeps the ceil((1 - filter_thres) * num_tokens) most likely ids, as the
        reference's ``top_k``. With ``return_memories_and_states``, also the memories and states after every token
        but the last generated one, as ``model(x[:, :-1], return_memories_and_states=True)`` would return them:
        feed that last token as the next prime to continue, as the reference's wrapper does.
        """
        check_tokens(prime, self.config.num_tokens, "prime")
        B, prime_len = prime.shape
        length = self.config.max_seq_len + 1 if length is None else length
        check_int("length", length, prime_len + 1)
        check_float("filter_thres", filter_thres, 0.0, 1.0, open_high=True)
        top_k = max(1, math.ceil((1 - filter_thres) * self.config.num_tokens))
        state = state_from_reference(self.config, xl_memories, states, B)
        out, ds = generate(
            self, prime, length - prime_len, temperature=temperature, top_k=top_k, state=state, return_state=True
        )
        if not return_memories_and_states:
            return out
        with eval_no_grad(self):
            committed = commit_partial(self, ds)
        return out, list(committed.memories), list(committed.states)


class RecurrentTrainerWrapper(SegmentRunner):
    """The reference's trainer wrapper: ``loss = wrapper(seq)`` for ``seq`` of ``k * max_seq_len + 1`` tokens, and
    ``wrapper.generate``; ``forward_backward`` (truncated back-propagation) comes from :class:`SegmentRunner`."""

    def forward(
        self,
        x: Tensor,
        return_memories_and_states: bool = False,
        *,
        labels: Tensor | None = None,
        state: ModelState | None = None,
        reset: Tensor | None = None,
    ):
        """Token-weighted mean loss over all segments, differentiable; states detached between segments.

        With no ``ignore_index`` labels this equals the reference's mean of per-segment losses.
        """
        loss, state = super().forward(x, labels=labels, state=state, reset=reset)
        if return_memories_and_states:
            return loss, list(state.memories), list(state.states)
        return loss

    @torch.no_grad()
    def generate(self, prime: Tensor, length: int, **kwargs):
        """The reference's wrapper ``generate``: the ``length - prime_len`` tokens (B, new) after ``prime``.

        One cached pass instead of the reference's window-by-window re-runs; ``kwargs`` are those of
        ``BlockRecurrentTransformer.generate`` (``temperature``, ``filter_thres``, and, new here, starting
        ``xl_memories`` / ``states`` and ``return_memories_and_states``).
        """
        # the reference's generate, whether the wrapped model is the reference's class or the core's
        return BlockRecurrentTransformer.generate(self.transformer, prime, length, **kwargs)
