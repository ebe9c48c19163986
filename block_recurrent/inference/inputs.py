"""Checks of what callers hand the decoder: the model, token ids, lists of prompts, decode states."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..model.checks import check_tokens
from ..model.layer import position
from ..model.model import BlockRecurrentModel
from ..model.state import checked_state


def check_model(model) -> None:
    """Decoding and evaluation take a BlockRecurrentModel (or a subclass, such as the reference's)."""
    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")


def check_decode_state(model, ds, batch_size: int) -> None:
    """A DecodeState fits ``model`` and a batch of ``batch_size`` rows, or a ValueError says what does not."""
    config = model.config
    width = config.block_width
    if len(ds.caches) != config.depth:
        raise ValueError(f"state.caches has {len(ds.caches)} layers; this model has depth={config.depth}")
    positions = [position(cache) for cache in ds.caches]
    if isinstance(positions[0], Tensor):
        bad = any(not isinstance(p, Tensor) or not torch.equal(p, positions[0]) for p in positions)
        bad = bad or positions[0].shape != (ds.batch_size,) or not bool(((positions[0] >= 0) & (positions[0] < width)).all())
    else:
        bad = len(set(positions)) != 1 or not 0 <= positions[0] < width
    if bad:
        raise ValueError(
            f"state.positions must be in [0, {width - 1}] (block_width={width}) and the same in every layer, "
            f"got {positions}"
        )
    if len(ds.views) != len(config.recurrent_layers):
        raise ValueError(
            f"state.views has {len(ds.views)} entries; this model has {len(config.recurrent_layers)} recurrent layers"
        )
    if ds.batch_size != batch_size:
        raise ValueError(f"state has batch size {ds.batch_size} but the prompt has {batch_size} rows")
    checked_state(config, ds.committed, batch_size)


def as_batch(tokens: Tensor, num_tokens: int, name: str) -> Tensor:
    """Token ids as (B, T): a 1-D tensor is one row. Raises on anything else or on ids out of range."""
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    check_tokens(tokens, num_tokens, name)
    return tokens


def check_prompts(prompts, num_tokens: int) -> list[Tensor]:
    """A non-empty list of 1-D token tensors of length >= 1 each, on one device."""
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of 1-D token tensors")
    checked = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, Tensor) or prompt.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D tensor of token ids, got {getattr(prompt, 'shape', prompt)!r}")
        check_tokens(prompt[None], num_tokens, f"prompts[{i}]")
        checked.append(prompt)
    if len({p.device for p in checked}) > 1:
        raise ValueError("prompts must all be on one device")
    return checked
