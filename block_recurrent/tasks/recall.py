"""Synthetic tasks generated on the fly (no download) that need memory beyond the attention window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.checks import check_int


@dataclass(frozen=True)
class RecallTask:
    """Remember one value token across ``distance`` blocks, then recall it.

    Layout of one row (length ``(distance + 1) * block_width``, ids in [0, vocab_size)):
    position 0 holds a value token (one of ``num_values``), the following positions hold filler tokens
    (drawn from a disjoint range), and the last position holds the query marker; its label is the value.
    Every other label is ``ignore_index``. With ``distance >= 2`` the value lies outside the XL memory
    (the previous block) of the query's block, so only a recurrent state can carry it: chance is
    ``1 / num_values``.
    """

    block_width: int
    distance: int = 6
    num_values: int = 32
    num_fillers: int = 32
    ignore_index: int = -100

    def __post_init__(self) -> None:
        for name in ("block_width", "distance", "num_values", "num_fillers"):
            check_int(name, getattr(self, name), 1)
        if self.length < 3:
            raise ValueError("the task needs at least 3 positions: (distance + 1) * block_width >= 3")

    @property
    def length(self) -> int:
        return (self.distance + 1) * self.block_width

    @property
    def vocab_size(self) -> int:
        return self.num_values + self.num_fillers + 1

    @property
    def query_token(self) -> int:
        return self.vocab_size - 1

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(inputs, labels), each (batch_size, length) long tensors."""
        values = torch.randint(0, self.num_values, (batch_size,), generator=generator)
        inputs = torch.randint(
            self.num_values, self.num_values + self.num_fillers, (batch_size, self.length), generator=generator
        )
        inputs[:, 0] = values
        inputs[:, -1] = self.query_token
        labels = torch.full_like(inputs, self.ignore_index)
        labels[:, -1] = values
        return inputs, labels

    @staticmethod
    def accuracy(logits: Tensor, labels: Tensor) -> float:
        """Fraction of queried positions (labels != ignore) whose argmax is the value."""
        queried = labels >= 0
        return (logits.argmax(dim=-1)[queried] == labels[queried]).float().mean().item()
