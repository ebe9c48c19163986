"""Segment training: a long sequence is cut into windows of ``max_seq_len`` tokens, run in order with the
memories and states threaded through, and back-propagated one segment (or k segments) at a time so that
training memory does not grow with the number of segments (truncated back-propagation through time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel
from ..model.checks import check_labels, check_probability, check_reset, check_tokens
from ..model.state import ModelState, checked_state


def passes_one_block(config: BlockRecurrentConfig, backward_every: int) -> bool:
    """Whether each backward pass covers exactly one block (segments of one block, back-propagated one at a time):
    then the state written at a block's end is read only after the carry is detached, and the write trains only
    when it is replayed (``replay_write``)."""
    return config.max_seq_len == config.block_width and backward_every == 1


def check_replay_write(config: BlockRecurrentConfig, backward_every: int) -> None:
    """Raise unless ``replay_write`` can be used: backward passes of one block."""
    if not passes_one_block(config, backward_every):
        raise ValueError(
            f"replay_write is for backward passes of one block (max_seq_len = block_width = {config.block_width} and "
            f"backward_every = 1), got max_seq_len={config.max_seq_len}, backward_every={backward_every}; with two "
            "blocks or more per pass the write trains without it"
        )


@dataclass(frozen=True)
class SegmentResult:
    """What :meth:`SegmentRunner.forward_backward` returns."""

    loss: Tensor  # detached token-weighted mean loss over the whole sequence
    tokens: int  # number of labels that counted (not ignore_index)
    # detached state after the last segment, to continue the documents next step; with ``replay_write`` the last
    # block's write is left to the next call, which replays it: the recurrent states are still those that block
    # read (:meth:`SegmentRunner.written_state` writes them, for another use)
    state: ModelState
    # with ``replay_write``: per recurrent layer, the (detached) state that the last block's write starts from
    # (None: the learned initial state); pass it with ``state`` as the next call's ``written_from``
    written_from: tuple[Tensor | None, ...] | None = None


class SegmentRunner(nn.Module):
    """A long sequence in windows of ``max_seq_len`` tokens, run in order with the state threaded through.

    ``forward`` returns the token-weighted mean loss of all windows in one graph; ``forward_backward``
    back-propagates every ``backward_every`` windows, so that memory does not grow with their number.

    ``xl_memories_dropout`` / ``state_dropout``: per segment, the probability of starting it with an empty
    memory / the initial state (whole batch), as in the reference. Never applied in eval mode, whether
    the runner or only the inner model was put in eval mode.
    """

    def __init__(self, transformer: BlockRecurrentModel, xl_memories_dropout: float = 0.0, state_dropout: float = 0.0):
        super().__init__()
        if not isinstance(transformer, BlockRecurrentModel):
            raise TypeError(f"transformer must be a BlockRecurrentModel, got {type(transformer).__name__}")
        check_probability("xl_memories_dropout", xl_memories_dropout)
        check_probability("state_dropout", state_dropout)
        self.transformer = transformer
        self.seq_len = transformer.config.max_seq_len
        self.xl_memories_dropout = xl_memories_dropout
        self.state_dropout = state_dropout

    def _segments(self, x: Tensor, labels: Tensor | None) -> list[tuple[Tensor, Tensor]]:
        """(inputs, labels) per segment of ``seq_len`` tokens."""
        config = self.transformer.config
        if labels is None:
            check_tokens(x, config.num_tokens)
            total = x.shape[1] - 1
            if total < 1 or total % self.seq_len:
                raise ValueError(
                    f"x has {x.shape[1]} tokens per row; the wrapper needs k * max_seq_len + 1 "
                    f"(max_seq_len={self.seq_len}, k >= 1: one extra token for the last label)"
                )
            inputs, labels = x[:, :-1], x[:, 1:]
        else:
            check_tokens(x, config.num_tokens)
            check_labels(labels, x.shape, config.num_tokens, config.ignore_index)
            if x.shape[1] % self.seq_len:
                raise ValueError(
                    f"with labels, x must have k * max_seq_len tokens per row (max_seq_len={self.seq_len}), "
                    f"got {x.shape[1]}"
                )
            inputs = x
        return list(zip(inputs.split(self.seq_len, dim=1), labels.split(self.seq_len, dim=1)))

    def _dropout(self, state: ModelState) -> ModelState:
        if not (self.training and self.transformer.training):
            return state
        memories, states = state.memories, state.states
        if self.xl_memories_dropout > 0 and torch.rand(()).item() < self.xl_memories_dropout:
            memories = (None,) * len(memories)
        if self.state_dropout > 0 and torch.rand(()).item() < self.state_dropout:
            states = (None,) * len(states)
        return ModelState(memories, states)

    def _starting_state(self, x, state, reset, written_from=None) -> ModelState:
        B = x.shape[0]
        state = checked_state(self.transformer.config, state, B)
        if written_from is not None:
            state = self._replayed_write(state, written_from)
        if reset is not None:
            check_reset(reset, B)
            state = state.reset_rows(reset.to(x.device), self.transformer.initial_states())
        return state

    # the write replayed: with one block per backward pass, the state written at a block's end is first read in
    # the next pass, after the carry is detached, so no loss reaches the write's parameters. Doing the write at
    # the start of the next pass instead, from its detached inputs (the state it starts from and the block's
    # keys/values, which the writing layer's memory still holds), gives the same state with a graph to the
    # write's parameters: they learn from the next block's loss, one block deep. The block's own pass leaves the
    # write out (``run(write_last=False)``), so the replay costs a write's backward, not a second forward.

    def _replayed_write(self, state: ModelState, written_from: tuple[Tensor | None, ...]) -> ModelState:
        """``state`` with each recurrent state written from ``written_from`` (the states its last block started
        from) and that block's keys/values (the end of the writing layer's memory), with a graph to the write's
        parameters."""
        config, W = self.transformer.config, self.transformer.config.block_width
        if not isinstance(written_from, tuple) or len(written_from) != len(config.recurrent_layers):
            raise ValueError(f"written_from must be a tuple of {len(config.recurrent_layers)} states (one per "
                             "recurrent layer), as SegmentResult.written_from gives it")
        B = state.batch_size
        written_from = checked_state(config, ModelState((None,) * config.depth, written_from), B).states
        for layer, start in zip(config.recurrent_layers, written_from):
            memory = state.memories[layer - 1]
            if memory is None or memory.length < W:
                raise ValueError(f"written_from is given, but layer {layer}'s memory does not hold the last block "
                                 "it was written from; pass the state that came with it")
        model = self.transformer
        blocks = tuple(None if m is None else (m.keys[:, -W:], m.values[:, -W:]) for m in state.memories)
        return model.commit_block(state, model.state_views(written_from, B), blocks, advance_memories=False)

    # one loop for both: segments in order, the state detached at every backward point

    def _run_segments(
        self, segments, state: ModelState, backward_every: int, weight: float | None, replay_write: bool = False
    ) -> tuple[Tensor, ModelState, tuple | None]:
        """Run ``segments`` from ``state``: (summed loss, state after the last segment, the states the last block
        started from with ``replay_write``). Every ``backward_every`` segments the state is detached; there, with
        a ``weight``, ``(loss * weight).backward()`` runs on the pending segments and the sum is kept detached;
        without one the sum keeps its graph."""
        total, pending, entering = None, None, None
        for index, (inputs, labels) in enumerate(segments):
            state = self._dropout(state)
            if replay_write:
                entering = state.detach().states
            logits, state = self.transformer.run(inputs, state, write_last=not replay_write)
            loss_sum = self.transformer.loss(logits, labels, reduction="sum")
            pending = loss_sum if pending is None else pending + loss_sum
            if (index + 1) % backward_every == 0 or index + 1 == len(segments):
                if weight is not None:
                    if pending.requires_grad:
                        (pending * weight).backward()
                    pending = pending.detach()
                total = pending if total is None else total + pending
                pending = None
                state = state.detach()
                if replay_write and index + 1 < len(segments):
                    state = self._replayed_write(state, entering)
        return total, state, entering

    def written_state(self, result: SegmentResult) -> ModelState:
        """``result.state`` with the last block's write done (with the current weights, without a graph): the
        state after the sequence, for a use other than the next :meth:`forward_backward` (which replays the write
        itself). Without ``replay_write`` that is ``result.state`` as it is."""
        if result.written_from is None:
            return result.state
        with torch.no_grad():
            return self._replayed_write(result.state, result.written_from)

    def _count(self, segments) -> int:
        ignore = self.transformer.config.ignore_index
        return sum(int((labels != ignore).sum()) for _, labels in segments)

    def forward(
        self, x: Tensor, *, labels: Tensor | None = None, state: ModelState | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, ModelState]:
        """Token-weighted mean loss over all segments, differentiable (states detached between segments), and
        the detached state after the last one.

        ``x``: (B, k * max_seq_len + 1) tokens, or (B, k * max_seq_len) inputs with ``labels`` of the same shape.
        """
        segments = self._segments(x, labels)
        loss_sum, state, _ = self._run_segments(segments, self._starting_state(x, state, reset), 1, None)
        return loss_sum / max(self._count(segments), 1), state

    def forward_backward(
        self,
        x: Tensor,
        *,
        labels: Tensor | None = None,
        state: ModelState | None = None,
        reset: Tensor | None = None,
        backward_every: int = 1,
        loss_scale: float = 1.0,
        replay_write: bool = False,
        written_from: tuple[Tensor | None, ...] | None = None,
    ) -> SegmentResult:
        """Run the segments in order, calling ``backward`` every ``backward_every`` segments.

        Gradients accumulate in ``.grad`` as for ``(loss * loss_scale).backward()`` on the token-weighted
        mean loss, except that they flow across at most ``backward_every`` segments (the state is detached
        in between). With ``backward_every=1`` they equal those of :meth:`forward`'s loss exactly.

        ``replay_write`` (backward passes of one block only): each pass starts with the previous block's state
        write, done with the graph attached, so that the write's parameters learn (see :meth:`_replayed_write`);
        the losses are unchanged, and the last block's write is left to the next call (``SegmentResult.state``).
        ``written_from``: the previous call's ``SegmentResult.written_from``, for the first block of this call
        (None when the rows carry nothing: a fresh start).
        """
        if isinstance(backward_every, bool) or not isinstance(backward_every, int) or backward_every < 1:
            raise ValueError(f"backward_every must be an int >= 1, got {backward_every!r}")
        if replay_write:
            check_replay_write(self.transformer.config, backward_every)
        elif written_from is not None:
            raise ValueError("written_from is given without replay_write=True")
        segments = self._segments(x, labels)
        state = self._starting_state(x, state, reset, written_from)
        tokens = self._count(segments)
        loss_sum, state, entering = self._run_segments(
            segments, state, backward_every, loss_scale / max(tokens, 1), replay_write
        )
        return SegmentResult(loss_sum / max(tokens, 1), tokens, state.detach(), entering)
