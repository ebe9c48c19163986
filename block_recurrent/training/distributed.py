"""Data parallelism: this process's place in a ``torchrun`` job (or a single process), and device choice.

Where bf16 autocast is on is decided in :mod:`block_recurrent.training.precision`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run; collectives run on CUDA under NCCL, on the CPU under gloo."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Distributed":
        """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a no-op without torchrun."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum over ranks, on ``tensor``'s device (itself when not distributed)."""
        if not self.active:
            return tensor
        moved = tensor.to(self._device())
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on all ranks), concatenated in rank order along dim 0."""
        if not self.active:
            return tensor
        moved = tensor.to(self._device()).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(parts, moved)
        return torch.cat(parts).to(tensor.device)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (cuda:LOCAL_RANK when CUDA is there, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a
    ValueError for any other name or a device this machine does not have."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={name!r} but MPS (Apple GPUs) is not available")
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device
