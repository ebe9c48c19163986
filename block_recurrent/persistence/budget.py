"""Sizes estimated before they are allocated, so that a setting too large for the machine is refused with one
line naming it and the estimate, instead of an allocator's traceback (or the kernel's OOM killer) minutes later.

The estimates are lower bounds from the config's numbers alone (nothing is built): a refusal is never wrong,
and a run that passes can still run short where the bound is loose (attention scores, allocator slack).
"""

from __future__ import annotations

import os

import torch

from ..model.config import BlockRecurrentConfig


def parameter_count(config: BlockRecurrentConfig) -> int:
    """A lower bound on the model's parameters: the token embedding and the output projection, and per layer
    its attention's projections and feed-forward (plus each recurrent layer's state vectors and their attention).
    """
    ff = config.ff_inner_dim * config.dim * (3 if config.ff_activation == "geglu" else 2)
    attention = config.dim * config.dim_head * (2 * config.heads + 2 * config.kv_heads)
    cell = config.num_state_vectors * config.dim + attention
    return 2 * config.num_tokens * config.dim + config.depth * (ff + attention) + len(config.recurrent_layers) * cell


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on ``device`` (free GPU memory; on the CPU, Linux's MemAvailable plus
    free swap); None where this cannot be told."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as info:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in info if line.count(":") == 1}
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def format_bytes(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024 or unit == "EiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_fits(parts: dict[str, int], device: torch.device, setting: str) -> None:
    """Raise a ValueError naming ``setting`` when the estimated ``parts`` (what -> bytes) exceed the memory
    available on ``device``; the error lists the parts, largest first."""
    available = available_memory(device)
    needed = sum(parts.values())
    if available is None or needed <= available:
        return
    listed = ", ".join(f"{what} {format_bytes(size)}" for what, size in sorted(parts.items(), key=lambda p: -p[1])
                       if size)
    raise ValueError(f"{setting}: needs at least {format_bytes(needed)} ({listed}); {device.type} memory available: "
                     f"{format_bytes(available)}")


def check_model_fits(config: BlockRecurrentConfig, device: torch.device, where: str, *, bytes_per_parameter: int = 8
                     ) -> None:
    """Refuse, naming ``where`` (a file or an option) and the config's sizes, a model whose parameters alone
    would not fit: ``bytes_per_parameter`` 8 counts the weights read from a file and the model's own copy."""
    sizes = f"num_tokens {config.num_tokens}, dim {config.dim}, depth {config.depth}"
    count = parameter_count(config)
    check_fits({f"{count:.3g} parameters": count * bytes_per_parameter}, device, f"{where} ({sizes})")
