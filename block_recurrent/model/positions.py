"""Rotary position embeddings with xPos scaling (Sun et al. 2022), as constant tables sliced per block.

Positions live in a fixed frame: a block's tokens take the last ``block_width`` slots and the XL memory
the slots just before them. Rotary angles and the xPos factors ``s**p`` (queries) and
``s**-p`` (keys) both make the attention logit a function of the distance alone, so any frame in which
the distances are right gives the same attention; fixing the frame lets a decoder that sees a block one
token at a time reproduce the full forward pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class RotaryTables(NamedTuple):
    """Rotary tables of some positions, each (positions, dim_head), already multiplied by the xPos factor.

    ``signed_sin`` is the sine with its first half negated, so that a rotation is one roll (see :func:`rotate`).
    """

    cos: Tensor
    signed_sin: Tensor


def rotate(t: Tensor, tables: RotaryTables) -> Tensor:
    """Rotate (and xPos-scale) ``t`` (..., positions, dim_head) by the tables of the same positions.

    The usual form is t * cos + rotate_half(t) * sin with rotate_half([t1, t2]) = [-t2, t1]. Here
    [-t2, t1] * [s1, s2] is written [t2, t1] * [-s1, s2], equal bit for bit (negation is exact), and
    [t2, t1] is a roll: two fewer operators per call, which counts when decoding one token at a time.
    """
    cos, signed_sin = tables.cos.to(t.dtype), tables.signed_sin.to(t.dtype)
    return t * cos + t.roll(t.shape[-1] // 2, dims=-1) * signed_sin


class RotaryXPos(nn.Module):
    """Constant rotary/xPos tables of a fixed frame; nothing here changes after construction.

    The frame has ``memory_len + block_width`` slots: a block's tokens take the last ``block_width`` slots and
    the XL memory the slots just before them. Queries and keys are addressed by their position in the block
    (memory slots at -M .. -1), the one rule the forward pass and the decoder share.
    """

    def __init__(self, dim_head: int, memory_len: int, block_width: int, theta: float = 10000.0,
                 scale_base: float = 512.0):
        super().__init__()
        width = memory_len + block_width
        self.block_start = memory_len  # frame slot of the block's first token
        half = torch.arange(0, dim_head, 2, dtype=torch.float64)
        inv_freq = 1.0 / (theta ** (half / dim_head))
        positions = torch.arange(width, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # (width, dim_head / 2)
        angles = torch.cat((angles, angles), dim=-1)  # (width, dim_head)

        # xPos: per-frequency decay base in (0, 1), raised to a power centred on the frame's middle
        decay = (half + 0.4 * dim_head) / (1.4 * dim_head)
        power = (positions - width // 2) / scale_base
        xpos = decay[None, :] ** power[:, None]
        xpos = torch.cat((xpos, xpos), dim=-1)  # (width, dim_head)

        sign = torch.ones(dim_head, dtype=torch.float64)
        sign[: dim_head // 2] = -1  # see rotate
        # built in float64 so that model.double() gets exact tables; stored in float32 by default
        tables = {
            "q_cos": angles.cos() * xpos,
            "q_sin": angles.sin() * sign * xpos,
            "k_cos": angles.cos() / xpos,
            "k_sin": angles.sin() * sign / xpos,
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)
        self._float64_tables = tables

    def _apply(self, fn, recurse=True):
        # converting to float64 re-derives the tables from the float64 originals instead of widening floats
        module = super()._apply(fn, recurse)
        if self.q_cos.dtype == torch.float64:
            for name, table in self._float64_tables.items():
                setattr(self, name, table.to(self.q_cos.device))
        return module

    def queries(self, start: int, stop: int) -> RotaryTables:
        """Tables of the queries at block positions start .. stop - 1."""
        start, stop = start + self.block_start, stop + self.block_start
        return RotaryTables(self.q_cos[start:stop], self.q_sin[start:stop])

    def queries_at(self, positions: Tensor) -> RotaryTables:
        """Tables of one query per row at block positions ``positions`` (B,), shaped (B, 1, 1, dh)."""
        slots = positions + self.block_start
        return RotaryTables(self.q_cos[slots][:, None, None], self.q_sin[slots][:, None, None])

    def keys_at(self, positions: Tensor) -> RotaryTables:
        """Tables of one key per row at block positions ``positions`` (B,), shaped (B, 1, 1, dh)."""
        slots = positions + self.block_start
        return RotaryTables(self.k_cos[slots][:, None, None], self.k_sin[slots][:, None, None])

    def keys(self, start: int, stop: int) -> RotaryTables:
        """Tables of the keys at block positions start .. stop - 1 (negative: memory slots)."""
        start, stop = start + self.block_start, stop + self.block_start
        return RotaryTables(self.k_cos[start:stop], self.k_sin[start:stop])

    def tables_at(self, position: int | Tensor, count: int) -> tuple[RotaryTables, RotaryTables]:
        """(query tables, key tables) of ``count`` tokens from block position ``position``: an int for rows that
        share it, or a (B,) tensor of each row's position (then one token per row)."""
        if isinstance(position, Tensor):
            return self.queries_at(position), self.keys_at(position)
        return self.queries(position, position + count), self.keys(position, position + count)


def t5_relative_bucket(distance: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bucket of each query-minus-key distance, for causal attention (distances <= 0 share bucket 0).

    Half the buckets count distances exactly (0 .. num_buckets/2 - 1); the rest cover distances up to
    ``max_distance`` logarithmically; anything farther falls in the last bucket.
    """
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    # log-spaced buckets for the far half; clamp n >= 1 so the log of the (unused) small values is finite
    far = exact + (
        torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    far = far.clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, far)


class T5RelativeBias(nn.Module):
    """A learned per-head logit bias for each distance bucket (the paper's position encoding)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bias = nn.Parameter(torch.randn(heads, num_buckets) * num_buckets**-0.5)

    def forward(self, distance: Tensor) -> Tensor:
        """distance (N, J), query position minus key position -> bias (H, N, J)."""
        return self.bias[:, t5_relative_bucket(distance, self.num_buckets, self.max_distance)]
