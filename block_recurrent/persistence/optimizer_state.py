"""An optimiser's state without pickle: its per-parameter tensors for safetensors, the rest (hyper-parameters,
step counts) as plain JSON."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .files import CheckpointError


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load what :func:`optimizer_to_tensors` wrote into ``optimizer`` (same parameter layout)."""
    tensors, info = saved["tensors"], saved["json"]
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.clone()  # never share storage with the caller's tensors
        for key, value in info.get("scalars", {}).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in info["param_groups"]]
        sizes = [len(g["params"]) for g in groups]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"the checkpoint's optimizer state is malformed ({error!r})") from error
    own = optimizer.state_dict()["param_groups"]
    if sizes != [len(g["params"]) for g in own]:
        raise CheckpointError("the checkpoint's optimizer state does not fit this model's parameter groups")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit: {error}") from error
