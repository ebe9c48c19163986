"""Argument checks shared by every public entry point: a clear ``TypeError``/``ValueError`` naming the
argument and its allowed range, never a bare ``assert`` (which ``python -O`` strips).

This module sits at the bottom of the package: it imports nothing from it, so the config, the state types,
the model and the trainer all check their input the same way.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

# scalars


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """An int (not a bool) >= minimum (and <= maximum when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_float(
    name: str, value: Any, low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> None:
    """A finite real number in [low, high] (``open_low``/``open_high`` exclude the bound; no upper bound when
    high is None). NaN and infinities are always refused: no setting of this library means anything there."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    too_low = value <= low if open_low else value < low
    too_high = high is not None and (value >= high if open_high else value > high)
    if not math.isfinite(value) or too_low or too_high:
        if high is None:
            allowed = f"> {low}" if open_low else f">= {low}"
        else:
            allowed = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number {allowed}, got {value}")


def check_probability(name: str, value: Any) -> None:
    """A number in [0, 1]."""
    check_float(name, value, 0.0, 1.0)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


# token tensors


def check_tokens(tokens: Any, num_tokens: int, name: str = "x") -> None:
    """Integer token ids (B, T), B, T >= 1, each in [0, num_tokens)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one token, got shape {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= num_tokens:
        raise ValueError(f"{name} holds token ids in [{low}, {high}]; allowed range is [0, {num_tokens - 1}]")


def check_labels(labels: Any, shape: torch.Size, num_tokens: int, ignore_index: int) -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer torch.Tensor")
    if labels.shape != shape:
        raise ValueError(f"labels must have the shape of x {tuple(shape)}, got {tuple(labels.shape)}")
    real = labels[labels != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_tokens):
        raise ValueError(
            f"labels must be in [0, {num_tokens - 1}] or ignore_index={ignore_index}, "
            f"got values in [{int(real.min())}, {int(real.max())}]"
        )


def check_reset(reset: Any, batch_size: int) -> None:
    if not isinstance(reset, Tensor) or reset.dtype != torch.bool:
        raise TypeError("reset must be a bool tensor of shape (batch,), True where a row starts a new document")
    if reset.shape != (batch_size,):
        raise ValueError(f"reset must have shape ({batch_size},), got {tuple(reset.shape)}")
