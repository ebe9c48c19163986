"""Streaming evaluation: score documents of any length (whole books) segment by segment.

The state is carried from segment to segment exactly as the trainer wrapper carries it, so the loss equals
``SegmentRunner.forward``'s on the same text; only one segment's logits are alive at a time, so
memory does not grow with the document's length.

- :func:`evaluate`: one document, or a batch of documents of equal length.
- :func:`evaluate_documents`: documents of different lengths side by side, each scored as if alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..model.checks import check_float, check_int
from ..model.model import BlockRecurrentModel
from ..model.state import ModelState, checked_state
from .decoding import eval_no_grad
from .inputs import as_batch, check_model



def bits_per_byte(loss: float, bytes_per_token: float = 1.0) -> float:
    """A loss in nats per token as bits per byte of text."""
    return loss / math.log(2) / bytes_per_token


@dataclass(frozen=True)
class EvalResult:
    """Scores of next-token prediction over one or more documents (natural-log losses)."""

    loss_sum: float  # summed cross-entropy over all predicted tokens
    tokens: int  # number of predicted tokens: B * (T - 1)
    loss: float  # loss_sum / tokens
    bits_per_token: float  # loss / ln 2
    bits_per_byte: float  # bits_per_token / bytes_per_token
    # (start, mean loss, count) per bucket of prediction positions [start, start + bucket_size): position
    # i predicts token i + 1 from tokens 0..i of the document; None unless bucket_size was given
    bucket_losses: list[tuple[int, float, int]] | None = None


    @classmethod
    def from_sums(
        cls, loss_sum: float, tokens: int, bytes_per_token: float, buckets: list[tuple[int, float, int]] | None = None
    ) -> "EvalResult":
        if tokens == 0:
            raise ValueError("no token was scored: give documents of at least 2 tokens")
        loss = loss_sum / tokens
        return cls(loss_sum, tokens, loss, bits_per_byte(loss), bits_per_byte(loss, bytes_per_token), buckets)


def _check_tokens(model, tokens) -> Tensor:
    check_model(model)
    tokens = as_batch(tokens, model.config.num_tokens, "tokens")  # a 1-D tensor is one document
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens must have at least 2 per document (an input and its next token), got {tokens.shape[1]}")
    return tokens


# Tokens per forward call when the caller gives no segment length and the model runs a segment's blocks side by
# side (``blocks_side_by_side``): each call then runs every layer once for all its blocks, so longer segments mean
# fewer calls: with brt train's default model (blocks of 16) 1,024 tokens scored the held-out split in about half
# the time of one block per call (docs/experiments/evaluation-speed.md). Capped by the longest document, so short
# documents are not padded to a long segment
EVAL_SEGMENT_TOKENS = 1024


def default_segment_len(model: BlockRecurrentModel, longest: int) -> int:
    """Evaluation's tokens per forward call for documents of at most ``longest`` predicted tokens: max_seq_len, or
    with ``blocks_side_by_side`` up to EVAL_SEGMENT_TOKENS (whole blocks, at least max_seq_len)."""
    config = model.config
    if not model.blocks_side_by_side:
        return config.max_seq_len
    W = config.block_width
    return max(config.max_seq_len, min(EVAL_SEGMENT_TOKENS // W, math.ceil(longest / W)) * W)


def _check_options(model, segment_len, bytes_per_token, bucket_size, longest: int) -> int:
    config = model.config
    segment_len = default_segment_len(model, longest) if segment_len is None else segment_len
    check_int("segment_len", segment_len, 1)
    if segment_len % config.block_width:
        # a segment that ended inside a block would commit that block early and change what is scored
        raise ValueError(
            f"segment_len must be a multiple of block_width={config.block_width}, got {segment_len}"
        )
    check_float("bytes_per_token", bytes_per_token, 0.0, open_low=True)
    if bucket_size is not None:
        check_int("bucket_size", bucket_size, 1)
    return segment_len


def evaluate(
    model: BlockRecurrentModel,
    tokens: Tensor | Sequence[Tensor],
    *,
    segment_len: int | None = None,
    state: ModelState | None = None,
    bytes_per_token: float = 1.0,
    bucket_size: int | None = None,
) -> EvalResult | list[EvalResult]:
    """Score next-token prediction over documents of any length, segment by segment, carrying the state.

    tokens: (T,) one document or (B, T) a batch of documents of equal length, T >= 2; the T - 1 tokens
        after the first are predicted. A list of 1-D documents of different lengths is scored side by side
        by :func:`evaluate_documents`, which returns one result per document.
    segment_len: tokens per forward call (a multiple of block_width; default :func:`default_segment_len`, up to
        1,024). The result does not depend on it beyond rounding; speed does, and memory (one segment's logits,
        (B, segment_len, V)).
    state: where the documents continue from (None: a fresh start).
    bytes_per_token: average bytes of text per token (1 for byte-level models), for bits per byte.
    bucket_size: also report the mean loss per bucket of this many prediction positions.

    Runs in eval mode without autograd (the caller's mode is restored). With segment_len = max_seq_len and
    T = k * max_seq_len + 1 the loss equals ``SegmentRunner(model)(tokens)`` in eval mode.
    """
    if isinstance(tokens, (list, tuple)):  # documents of different lengths: one result each
        if state is not None:
            raise ValueError("a list of documents is scored from fresh states: state must be None")
        return evaluate_documents(model, list(tokens), segment_len=segment_len, bytes_per_token=bytes_per_token,
                                  bucket_size=bucket_size)
    tokens = _check_tokens(model, tokens)
    segment_len = _check_options(model, segment_len, bytes_per_token, bucket_size, tokens.shape[1] - 1)
    B, T = tokens.shape
    predicted, device = T - 1, tokens.device
    # each row is a lane holding one document, carried on from ``state`` (no reset)
    lanes = _Lanes(
        inputs=tokens[:, :-1], labels=tokens[:, 1:],
        owner=torch.arange(B, device=device)[:, None].expand(B, predicted),
        position=torch.arange(predicted, device=device).expand(B, predicted),
        starts=torch.zeros(B, math.ceil(predicted / segment_len), dtype=torch.bool, device=device),
        segments=torch.full((B,), math.ceil(predicted / segment_len), device=device),
    )
    sums, bucket_sums = _score_lanes(model, lanes, [predicted] * B, segment_len, bucket_size,
                                     checked_state(model.config, state, B))
    buckets = None
    if bucket_sums is not None:  # every row has the same buckets: pool them
        buckets = _buckets(bucket_sums.view(B, -1).sum(dim=0), bucket_size, B, predicted)
    return EvalResult.from_sums(float(sums.sum()), B * predicted, bytes_per_token, buckets)


def _buckets(sums: Tensor, size: int, rows: int, predicted: int) -> list[tuple[int, float, int]]:
    buckets = []
    for index, total in enumerate(sums.tolist()):
        start = index * size
        count = rows * (min(start + size, predicted) - start)
        buckets.append((start, total / count, count))
    return buckets


@dataclass(frozen=True)
class _Lanes:
    """Documents laid out in rows (lanes) for scoring, segment after segment: (B, L) inputs and labels
    (ignore_index on padding), the document each input belongs to (-1 on padding) and its position in it;
    (B, steps) where a document starts (the row is reset there); (B,) segments each lane holds."""

    inputs: Tensor
    labels: Tensor
    owner: Tensor
    position: Tensor
    starts: Tensor
    segments: Tensor

    def rows(self, rows: Tensor) -> "_Lanes":
        return _Lanes(*(t[rows] for t in (self.inputs, self.labels, self.owner, self.position, self.starts,
                                          self.segments)))


def _score_lanes(
    model: BlockRecurrentModel, lanes: _Lanes, predicted: Sequence[int], segment_len: int, bucket_size: int | None,
    state: ModelState | None, carry: Callable[[ModelState], ModelState] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The evaluation loop: every lane segment by segment from ``state``, rows reset where their next document
    starts, lanes whose documents are done leaving the batch. Returns the summed loss of each document
    (``predicted`` holds their lengths) and, with ``bucket_size``, the summed loss of each document's buckets,
    document after document. ``carry``: applied to the state each segment leaves, before the next one reads it."""
    device = lanes.inputs.device
    sums = torch.zeros(len(predicted), dtype=torch.float64, device=device)
    bucket_sums = bucket_base = None
    if bucket_size is not None:
        counts = [math.ceil(n / bucket_size) for n in predicted]
        bucket_base = torch.tensor([0] + counts[:-1], device=device).cumsum(0)  # each document's first bucket
        bucket_sums = torch.zeros(sum(counts), dtype=torch.float64, device=device)
    with eval_no_grad(model, inference=True):  # only numbers leave
        for step in range(int(lanes.segments.max())):
            active = lanes.segments > step
            if not bool(active.all()):
                rows = active.nonzero()[:, 0]
                lanes, state = lanes.rows(rows), state.select_rows(rows)
            window = slice(step * segment_len, (step + 1) * segment_len)
            reset = lanes.starts[:, step] if bool(lanes.starts[:, step].any()) else None
            logits, state = model.run(lanes.inputs[:, window], state, reset=reset)  # the only large tensor
            if carry is not None:
                state = carry(state)
            labels = lanes.labels[:, window]
            losses = model.loss(logits, labels, reduction="none").view(labels.shape).double()
            owner = lanes.owner[:, window]
            scored = owner >= 0
            sums.index_add_(0, owner[scored], losses[scored])
            if bucket_sums is not None:
                at = bucket_base[owner[scored]] + lanes.position[:, window][scored] // bucket_size
                bucket_sums.index_add_(0, at, losses[scored])
    return sums, bucket_sums


def evaluate_documents(
    model: BlockRecurrentModel,
    documents: Sequence[Tensor],
    *,
    batch_size: int = 16,
    segment_len: int | None = None,
    bytes_per_token: float = 1.0,
    bucket_size: int | None = None,
    carry: Callable[[ModelState], ModelState] | None = None,
) -> list[EvalResult]:
    """Score documents of different lengths side by side; one result per document, each equal (to rounding)
    to ``evaluate(model, document)``: every document is scored from a fresh state.

    ``carry`` (for diagnostics, :mod:`.diagnostics`): applied to the state every segment leaves, before the next
    segment reads it; give ``segment_len=block_width`` to apply it after every block.

    The documents are dealt to ``batch_size`` lanes (the longest first, each to the least loaded lane); a lane
    reads its documents one after another, each padded to a whole number of segments, and its row is reset
    (empty memory, initial state) where a document starts; a lane whose documents are done leaves the batch.
    Padding is scored by nothing and influences nothing that is scored: it only follows a document's last token.
    Runs in eval mode without autograd, under the caller's autocast if any.
    """
    if not isinstance(documents, Sequence) or isinstance(documents, Tensor) or not documents:
        raise TypeError("documents must be a non-empty list of 1-D token tensors")
    docs = [_check_tokens(model, doc)[0] if isinstance(doc, Tensor) and doc.ndim == 1 else None for doc in documents]
    if any(doc is None for doc in docs):
        raise ValueError("documents must be 1-D token tensors (one document each)")
    check_int("batch_size", batch_size, 1)
    segment_len = _check_options(model, segment_len, bytes_per_token, bucket_size, max(len(doc) for doc in docs) - 1)
    device, ignore = docs[0].device, model.config.ignore_index

    # 1. deal the documents to lanes; a document takes whole segments, predictions at inputs 0 .. T - 2
    segments_of = [math.ceil((len(doc) - 1) / segment_len) for doc in docs]
    dealt: list[list[int]] = [[] for _ in range(min(batch_size, len(docs)))]
    loads = [0] * len(dealt)
    for index in sorted(range(len(docs)), key=lambda i: -segments_of[i]):
        lane = loads.index(min(loads))
        dealt[lane].append(index)
        loads[lane] += segments_of[index]

    # 2. per lane, inputs, labels (ignore_index on padding), which document and position each input is
    B, steps = len(dealt), max(loads)
    length = steps * segment_len
    inputs = torch.zeros(B, length, dtype=torch.long, device=device)
    labels = torch.full((B, length), ignore, dtype=torch.long, device=device)
    owner = torch.full((B, length), -1, dtype=torch.long, device=device)
    position = torch.zeros(B, length, dtype=torch.long, device=device)
    starts = torch.zeros(B, steps, dtype=torch.bool, device=device)
    for lane, indices in enumerate(dealt):
        at = 0
        for index in indices:
            doc, n = docs[index], len(docs[index]) - 1
            inputs[lane, at : at + n], labels[lane, at : at + n] = doc[:-1], doc[1:]
            owner[lane, at : at + n] = index
            position[lane, at : at + n] = torch.arange(n, device=device)
            starts[lane, at // segment_len] = True
            at += segments_of[index] * segment_len
    lanes = _Lanes(inputs, labels, owner, position, starts, torch.tensor(loads, device=device))

    # 3. the evaluation loop, then one result per document
    predicted = [len(doc) - 1 for doc in docs]
    sums, bucket_sums = _score_lanes(model, lanes, predicted, segment_len, bucket_size, None, carry)
    results, first = [], 0  # first: the document's first bucket
    for index, n in enumerate(predicted):
        buckets = None
        if bucket_sums is not None:
            count = math.ceil(n / bucket_size)
            buckets = _buckets(bucket_sums[first : first + count], bucket_size, 1, n)
            first += count
        results.append(EvalResult.from_sums(float(sums[index]), n, bytes_per_token, buckets))
    return results


def position_curve(results: Sequence[EvalResult], bytes_per_token: float = 1.0) -> list[tuple[int, float, int]]:
    """Bits per byte by position in the document, every document pooled: (bucket start, bits per byte, predictions
    pooled) per bucket start, from results scored with ``bucket_size``."""
    pooled: dict[int, list[float]] = {}
    for result in results:
        if result.bucket_losses is None:
            raise ValueError("position_curve needs results scored with bucket_size")
        for start, loss, count in result.bucket_losses:
            sums = pooled.setdefault(start, [0.0, 0])
            sums[0] += loss * count
            sums[1] += count
    return [(start, total / count / math.log(2) / bytes_per_token, count)
            for start, (total, count) in sorted(pooled.items())]


def curve_range(curve: Sequence[tuple[int, float, int]], begin: int, end: int | None = None) -> tuple[float, int]:
    """(bits per byte, predictions) pooled over a :func:`position_curve`'s buckets that start in [begin, end);
    NaN bits where there is none."""
    inside = [(bits, count) for start, bits, count in curve if begin <= start and (end is None or start < end)]
    count = sum(count for _, count in inside)
    return (sum(bits * count for bits, count in inside) / count if count else float("nan")), count
