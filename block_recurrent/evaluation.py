"""Streaming evaluation: score a document of any length (a whole book) segment by segment.

The state is carried from segment to segment exactly as the trainer wrapper carries it, so the loss equals
``RecurrentTrainerWrapper.forward``'s on the same text; only one segment's logits are alive at a time, so
memory does not grow with the document's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .decoding import eval_no_grad
from .model import BlockRecurrentTransformer
from .checks import check_float, check_int, check_tokens
from .state import ModelState, checked_state

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


def _check_arguments(model, tokens, segment_len, bytes_per_token, bucket_size) -> tuple[Tensor, int]:
    if not isinstance(model, BlockRecurrentTransformer):
        raise TypeError(f"model must be a BlockRecurrentTransformer, got {type(model).__name__}")
    config = model.config
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]  # one document
    check_tokens(tokens, config.num_tokens, "tokens")
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens must have at least 2 per document (an input and its next token), got {tokens.shape[1]}")

    segment_len = config.max_seq_len if segment_len is None else segment_len
    check_int("segment_len", segment_len, 1)
    if segment_len % config.block_width:
        # a segment that ended inside a block would commit that block early and change what is scored
        raise ValueError(
            f"segment_len must be a multiple of block_width={config.block_width}, got {segment_len}"
        )
    check_float("bytes_per_token", bytes_per_token, 0.0, open_low=True)
    if bucket_size is not None:
        check_int("bucket_size", bucket_size, 1)
    return tokens, segment_len


def _score_segment(
    model: BlockRecurrentTransformer, inputs: Tensor, labels: Tensor, state: ModelState
) -> tuple[Tensor, ModelState]:
    """Per-token losses (B, N) of one segment, and the state after it."""
    logits, state = model.run(inputs, state)  # (B, N, V): the only large tensor, freed on return
    losses = model.loss(logits, labels, reduction="none")  # (B * N,)
    return losses.view(labels.shape).double(), state


def evaluate(
    model: BlockRecurrentTransformer,
    tokens: Tensor,
    *,
    segment_len: int | None = None,
    state: ModelState | None = None,
    bytes_per_token: float = 1.0,
    bucket_size: int | None = None,
) -> EvalResult:
    """Score next-token prediction over documents of any length, segment by segment, carrying the state.

    tokens: (T,) one document or (B, T) a batch of documents of equal length, T >= 2; the T - 1 tokens
        after the first are predicted.
    segment_len: tokens per forward call (default max_seq_len; a multiple of block_width). The result does
        not depend on it beyond rounding; only memory does (one segment's logits, (B, segment_len, V)).
    state: where the documents continue from (None: a fresh start).
    bytes_per_token: average bytes of text per token (1 for byte-level models), for bits per byte.
    bucket_size: also report the mean loss per bucket of this many prediction positions.

    Runs in eval mode without autograd (the caller's mode is restored). With segment_len = max_seq_len and
    T = k * max_seq_len + 1 the loss equals ``RecurrentTrainerWrapper(model)(tokens)`` in eval mode.
    """
    tokens, segment_len = _check_arguments(model, tokens, segment_len, bytes_per_token, bucket_size)
    B, T = tokens.shape
    predicted = T - 1
    state = checked_state(model.config, state, B)

    loss_sum = torch.zeros((), dtype=torch.float64, device=tokens.device)
    bucket_sums = None
    if bucket_size is not None:
        bucket_sums = torch.zeros(math.ceil(predicted / bucket_size), dtype=torch.float64, device=tokens.device)

    with eval_no_grad(model):
        for begin in range(0, predicted, segment_len):
            end = min(begin + segment_len, predicted)
            losses, state = _score_segment(model, tokens[:, begin:end], tokens[:, begin + 1 : end + 1], state)
            loss_sum += losses.sum()
            if bucket_sums is not None:
                positions = torch.arange(begin, end, device=tokens.device)
                bucket_sums.index_add_(0, positions // bucket_size, losses.sum(dim=0))  # summed over rows

    count = B * predicted
    total = loss_sum.item()
    loss = total / count
    bits = loss / math.log(2)
    return EvalResult(total, count, loss, bits, bits / bytes_per_token, _buckets(bucket_sums, bucket_size, B, predicted))


def _buckets(sums: Tensor | None, size: int | None, rows: int, predicted: int) -> list[tuple[int, float, int]] | None:
    if sums is None:
        return None
    buckets = []
    for index, total in enumerate(sums.tolist()):
        start = index * size
        count = rows * (min(start + size, predicted) - start)
        buckets.append((start, total / count, count))
    return buckets


def evaluate_corpus(
    model: BlockRecurrentTransformer, corpus: "TokenCorpus", *, max_tokens: int | None = None,
    distributed: "Distributed | None" = None,
) -> dict[str, float]:
    """Loss and bits per byte over a corpus's documents, each scored from a fresh state by ``evaluate``.

    Documents are taken whole in order until ``max_tokens`` (the last one cut short); with several ranks each
    scores every world_size-th document and the sums are all-reduced.
    """
    if distributed is None:
        from .distributed import Distributed

        distributed = Distributed()
    docs, budget = [], corpus.num_tokens if max_tokens is None else max_tokens
    for i in range(len(corpus)):
        doc = corpus.document(i)[:budget]
        if budget < 2:
            break
        if len(doc) >= 2:
            docs.append(doc)
            budget -= len(doc)
    totals = torch.zeros(2, dtype=torch.float64)
    for doc in docs[distributed.rank :: distributed.world_size]:
        tokens = torch.from_numpy(doc.astype("int64"))[None].to(model.device)
        result = evaluate(model, tokens)
        totals += torch.tensor([float(result.loss_sum), float(result.tokens)], dtype=torch.float64)
    loss_sum, count = distributed.all_reduce(totals).tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "bpb": loss / math.log(2) / corpus.bytes_per_token, "tokens": int(count), "documents": len(docs)}
