"""A corpus's held-out documents scored whole (``brt eval``, the trainer's validation), split across ranks."""

from __future__ import annotations

import math

import torch

from ..inference.evaluation import evaluate_documents
from ..model.model import BlockRecurrentModel
from .data import TokenCorpus
from .distributed import Distributed


def take_documents(corpus: TokenCorpus, max_tokens: int | None = None, spread: bool = False) -> list:
    """The corpus's documents (token arrays) of at least 2 tokens within ``max_tokens``: taken whole in order
    until the budget is spent (the last one cut short), or with ``spread`` the first ``max_tokens // documents``
    tokens (at least 2) of every document. Raises ValueError when nothing is left."""
    docs, budget = [], corpus.token_count if max_tokens is None else max_tokens
    share = None if max_tokens is None or not spread else max(2, max_tokens // max(len(corpus), 1))
    for i in range(len(corpus)):
        doc = corpus.document(i)[: budget if share is None else share]
        if budget < 2:
            break
        if len(doc) >= 2:
            docs.append(doc)
            budget -= len(doc)
    if not docs:
        raise ValueError(f"nothing was scored: no document of at least 2 tokens within max_tokens={max_tokens}")
    return docs


def evaluate_corpus(
    model: BlockRecurrentModel, corpus: TokenCorpus, *, max_tokens: int | None = None,
    distributed: Distributed | None = None, batch_size: int = 16, spread: bool = False, segment_len: int | None = None,
) -> dict[str, float]:
    """Loss and bits per byte over a corpus's documents, each scored from a fresh state, ``batch_size`` side by
    side (:func:`evaluate_documents`).

    Documents are taken whole in order until ``max_tokens`` (the last one cut short); with ``spread`` the budget
    is shared instead: every document gives its first ``max_tokens // documents`` tokens (at least 2), a sample
    of the whole corpus that stays the same from one validation to the next. With several ranks each scores every
    world_size-th document and the sums are all-reduced. Raises ValueError when nothing would be scored (no
    document of at least 2 tokens within the budget).
    """
    docs = take_documents(corpus, max_tokens, spread)
    rank, world = (0, 1) if distributed is None else (distributed.rank, distributed.world_size)
    mine = [torch.from_numpy(doc.astype("int64")).to(model.device) for doc in docs[rank::world]]
    totals = torch.zeros(2, dtype=torch.float64)
    if mine:
        for result in evaluate_documents(model, mine, batch_size=batch_size, segment_len=segment_len,
                                         bytes_per_token=corpus.bytes_per_token):
            totals += torch.tensor([result.loss_sum, result.tokens], dtype=torch.float64)
    if distributed is not None:
        totals = distributed.all_reduce(totals)
    loss_sum, count = totals.tolist()
    loss = loss_sum / count
    return {"loss": loss, "bpb": loss / math.log(2) / corpus.bytes_per_token, "tokens": int(count), "documents": len(docs)}


