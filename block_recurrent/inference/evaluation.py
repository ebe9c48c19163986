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

import torch
from torch import Tensor

from typing import Sequence

from ..model.checks import check_float, check_int, check_tokens
from .decoding import eval_no_grad
from ..model.model import BlockRecurrentModel
from ..model.state import ModelState, checked_state



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
        bits = loss / math.log(2)
        return cls(loss_sum, tokens, loss, bits, bits / bytes_per_token, buckets)


def _check_tokens(model, tokens) -> Tensor:
    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]  # one document
    check_tokens(tokens, model.config.num_tokens, "tokens")
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


def _score_segment(
    model: BlockRecurrentModel, inputs: Tensor, labels: Tensor, state: ModelState | None,
    reset: Tensor | None = None,
) -> tuple[Tensor, ModelState]:
    """Per-token losses (B, N) of one segment (0 where a label is ignore_index), and the state after it."""
    logits, state = model.run(inputs, state, reset=reset)  # (B, N, V): the only large tensor, freed on return
    losses = model.loss(logits, labels, reduction="none")  # (B * N,)
    return losses.view(labels.shape).double(), state


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
    predicted = T - 1
    state = checked_state(model.config, state, B)

    loss_sum = torch.zeros((), dtype=torch.float64, device=tokens.device)
    bucket_sums = None
    if bucket_size is not None:
        bucket_sums = torch.zeros(math.ceil(predicted / bucket_size), dtype=torch.float64, device=tokens.device)

    with eval_no_grad(model, inference=True):  # only numbers leave
        for begin in range(0, predicted, segment_len):
            end = min(begin + segment_len, predicted)
            losses, state = _score_segment(model, tokens[:, begin:end], tokens[:, begin + 1 : end + 1], state)
            loss_sum += losses.sum()
            if bucket_sums is not None:
                positions = torch.arange(begin, end, device=tokens.device)
                bucket_sums.index_add_(0, positions // bucket_size, losses.sum(dim=0))  # summed over rows

    buckets = _buckets(bucket_sums, bucket_size, B, predicted)
    return EvalResult.from_sums(loss_sum.item(), B * predicted, bytes_per_token, buckets)


def _buckets(sums: Tensor | None, size: int | None, rows: int, predicted: int) -> list[tuple[int, float, int]] | None:
    if sums is None:
        return None
    buckets = []
    for index, total in enumerate(sums.tolist()):
        start = index * size
        count = rows * (min(start + size, predicted) - start)
        buckets.append((start, total / count, count))
    return buckets


def evaluate_documents(
    model: BlockRecurrentModel,
    documents: Sequence[Tensor],
    *,
    batch_size: int = 16,
    segment_len: int | None = None,
    bytes_per_token: float = 1.0,
    bucket_size: int | None = None,
) -> list[EvalResult]:
    """Score documents of different lengths side by side; one result per document, each equal (to rounding)
    to ``evaluate(model, document)``: every document is scored from a fresh state.

    The documents are dealt to ``batch_size`` lanes (the longest first, each to the least loaded lane); a lane
    reads its documents one after another, each padded to a whole number of segments, and its row is reset
    (empty memory, initial state) where a document starts; a lane whose documents are done leaves the batch. Padding is scored by nothing and influences nothing
    that is scored: it only follows a document's last token. Runs in eval mode without autograd, under the
    caller's autocast if any.
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
    lanes: list[list[int]] = [[] for _ in range(min(batch_size, len(docs)))]
    loads = [0] * len(lanes)
    for index in sorted(range(len(docs)), key=lambda i: -segments_of[i]):
        lane = loads.index(min(loads))
        lanes[lane].append(index)
        loads[lane] += segments_of[index]

    # 2. per lane, inputs, labels (ignore_index on padding), which document and position each input is
    B, steps = len(lanes), max(loads)
    length = steps * segment_len
    inputs = torch.zeros(B, length, dtype=torch.long, device=device)
    labels = torch.full((B, length), ignore, dtype=torch.long, device=device)
    owner = torch.full((B, length), -1, dtype=torch.long, device=device)  # document index, -1 on padding
    position = torch.zeros(B, length, dtype=torch.long, device=device)
    starts = torch.zeros(B, steps, dtype=torch.bool, device=device)  # a document starts at this segment
    for lane, indices in enumerate(lanes):
        at = 0
        for index in indices:
            doc, n = docs[index], len(docs[index]) - 1
            inputs[lane, at : at + n], labels[lane, at : at + n] = doc[:-1], doc[1:]
            owner[lane, at : at + n] = index
            position[lane, at : at + n] = torch.arange(n, device=device)
            starts[lane, at // segment_len] = True
            at += segments_of[index] * segment_len

    # 3. segment by segment, rows reset where their next document starts
    sums = torch.zeros(len(docs), dtype=torch.float64, device=device)
    bucket_sums = bucket_base = None
    if bucket_size is not None:
        counts = [math.ceil((len(doc) - 1) / bucket_size) for doc in docs]
        bucket_base = torch.tensor([0] + counts[:-1], device=device).cumsum(0)  # each document's first bucket
        bucket_sums = torch.zeros(sum(counts), dtype=torch.float64, device=device)
    state, lanes_left = None, torch.tensor(loads, device=device)  # segments each lane still has
    with eval_no_grad(model, inference=True):  # only numbers leave
        for step in range(steps):
            active = lanes_left > step
            if not bool(active.all()):  # lanes whose documents are done leave the batch
                rows = active.nonzero()[:, 0]
                inputs, labels, owner, position, starts = (t[rows] for t in (inputs, labels, owner, position, starts))
                state, lanes_left = state.select_rows(rows), lanes_left[rows]
            window = slice(step * segment_len, (step + 1) * segment_len)
            losses, state = _score_segment(model, inputs[:, window], labels[:, window], state, starts[:, step])
            scored = owner[:, window] >= 0
            sums.index_add_(0, owner[:, window][scored], losses[scored])
            if bucket_sums is not None:
                doc_of = owner[:, window][scored]
                bucket_sums.index_add_(0, bucket_base[doc_of] + position[:, window][scored] // bucket_size, losses[scored])

    results = []
    for index, doc in enumerate(docs):
        predicted = len(doc) - 1
        buckets = None
        if bucket_sums is not None:
            first = int(bucket_base[index])
            count = math.ceil(predicted / bucket_size)
            buckets = _buckets(bucket_sums[first : first + count], bucket_size, 1, predicted)
        results.append(EvalResult.from_sums(float(sums[index]), predicted, bytes_per_token, buckets))
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
