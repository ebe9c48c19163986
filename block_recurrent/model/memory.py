"""Transformer-XL memory: how a layer's cache of keys/values advances when a block is committed.

Two kinds with one signature, ``update(memory, keys, values) -> XLMemory``:
- ``FifoMemory``: keep the last ``block_width`` keys/values (the previous block).
- ``CompressedMemory``: as FIFO, and what falls out of it is compressed by a strided convolution
  (keys and values separately) into a second level of ``block_width // 2`` slots, oldest first.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import BlockRecurrentConfig
from .state import XLMemory


def _concat(memory: XLMemory | None, keys: Tensor, values: Tensor, valid: Tensor | None = None) -> XLMemory:
    """Concatenate new positions after ``memory``; validity stays None while everything is valid."""
    if memory is None:
        return XLMemory(keys, values, valid)
    if memory.valid is None and valid is None:
        merged_valid = None
    else:
        old = memory.valid if memory.valid is not None else keys.new_ones(memory.keys.shape[:2], dtype=torch.bool)
        new = valid if valid is not None else keys.new_ones(keys.shape[:2], dtype=torch.bool)
        merged_valid = torch.cat((old, new), dim=1)
    return XLMemory(
        torch.cat((memory.keys, keys), dim=1), torch.cat((memory.values, values), dim=1), merged_valid
    )


def _split_at(memory: XLMemory, at: int) -> tuple[XLMemory | None, XLMemory | None]:
    """(positions before ``at``, positions from ``at``); a negative ``at`` counts from the end."""
    length = memory.length
    at = max(0, length + at) if at < 0 else min(at, length)

    def part(sl: slice) -> XLMemory | None:
        keys = memory.keys[:, sl]
        if keys.shape[1] == 0:
            return None
        valid = None if memory.valid is None else memory.valid[:, sl]
        return XLMemory(keys, memory.values[:, sl], valid)

    return part(slice(0, at)), part(slice(at, None))


class FifoMemory(nn.Module):
    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        self.length = config.block_width

    def update(self, memory: XLMemory | None, keys: Tensor, values: Tensor) -> XLMemory:
        _, kept = _split_at(_concat(memory, keys, values), -self.length)
        return kept


class CompressedMemory(nn.Module):
    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        self.recent_length, self.compressed_length = config.memory_lengths
        self.factor = config.compressed_mem_factor
        channels = config.kv_dim * 2
        # groups=2: keys and values are compressed by separate filters
        self.compress = nn.Conv1d(channels, channels, self.factor, stride=self.factor, groups=2)

    def _compress(self, overflow: XLMemory) -> XLMemory | None:
        usable = (overflow.length // self.factor) * self.factor
        if usable == 0:
            return None
        _, overflow = _split_at(overflow, -usable)  # the oldest remainder is dropped, as in the reference
        kv = torch.cat((overflow.keys, overflow.values), dim=-1)  # (B, n, 2 * kv_dim)
        kv = self.compress(rearrange(kv, "b n c -> b c n"))
        keys, values = rearrange(kv, "b c n -> b n c").chunk(2, dim=-1)
        valid = None
        if overflow.valid is not None:
            # a compressed slot is valid only if every token it summarises is
            valid = rearrange(overflow.valid, "b (n f) -> b n f", f=self.factor).all(dim=-1)
        return XLMemory(keys, values, valid)

    def update(self, memory: XLMemory | None, keys: Tensor, values: Tensor) -> XLMemory:
        compressed, recent = (None, None) if memory is None else _split_at(memory, -self.recent_length)
        overflow, recent = _split_at(_concat(recent, keys, values), -self.recent_length)
        if overflow is not None:
            new_compressed = self._compress(overflow)
            if new_compressed is not None:
                merged = new_compressed if compressed is None else _concat(
                    compressed, new_compressed.keys, new_compressed.values, new_compressed.valid
                )
                _, compressed = _split_at(merged, -self.compressed_length)
        if compressed is None:
            return recent
        return _concat(compressed, recent.keys, recent.values, recent.valid)


MEMORY_KINDS: dict[str, type[nn.Module]] = {"fifo": FifoMemory, "compressed": CompressedMemory}


def build_memory(config: BlockRecurrentConfig) -> nn.Module:
    return MEMORY_KINDS["compressed" if config.use_compressed_mem else "fifo"](config)
