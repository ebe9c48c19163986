"""A document's decode state on disk: keep where a long document (or a prompt) stands, continue it later.

One safetensors file holds what the state is made of (:func:`~block_recurrent.inference.decoding.decode_state_parts`:
the committed memories and recurrent states, each row's position in its block, the block's raw keys and values so
far); the views, prepared keys and masks are rebuilt from them on loading. Its metadata names the format, whether
the rows kept their own positions, and fingerprints of the model's config and weights: a state is refused by any
other model (another config, or the same config with other weights), with a message that says which.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..inference.decoding import DecodeState, decode_state_from_parts, decode_state_parts
from ..inference.inputs import check_model
from ..model.model import BlockRecurrentModel
from ..model.state import ModelState
from .files import CheckpointError, check_finite
from .storage import finish_file, fsync_dir

FORMAT = "block-recurrent decode state 1"
COMMITTED = "committed"


def config_fingerprint(model: BlockRecurrentModel) -> str:
    return hashlib.sha256(model.config.to_json().encode()).hexdigest()


def weights_fingerprint(model: BlockRecurrentModel) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: the same model, to the last bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def save_decode_state(model: BlockRecurrentModel, state: DecodeState, path: str | Path) -> Path:
    """Write ``state`` (of ``model``) to ``path``, atomically: a reader sees the old file or the new one."""
    check_model(model)
    if not isinstance(state, DecodeState):
        raise TypeError(f"state must be a DecodeState, got {type(state).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; give a file name (e.g. state.safetensors)")
    committed, positions, blocks = decode_state_parts(state)
    tensors = committed.to_tensors(COMMITTED)
    tensors["positions"] = positions
    for i, (keys, values) in enumerate(blocks):
        tensors[f"block.{i}.keys"], tensors[f"block.{i}.values"] = keys, values
    metadata = {
        "format": FORMAT, "per_row": str(state.per_row), "config_sha256": config_fingerprint(model),
        "weights_sha256": weights_fingerprint(model), "config": model.config.to_json(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(partial), metadata)
    finish_file(partial)
    os.replace(partial, path)
    fsync_dir(path.parent)
    return path


def load_decode_state(model: BlockRecurrentModel, path: str | Path) -> DecodeState:
    """The decode state saved at ``path``, for ``model`` (on its device). Raises CheckpointError when the file is
    not a decode state, is damaged, or was saved from another model."""
    check_model(model)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no decode state at {path} (no such file)")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({error})") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a decode state (its format is {metadata.get('format')!r})")
    if metadata.get("config_sha256") != config_fingerprint(model):
        raise CheckpointError(
            f"{path} was saved from a model of another config ({metadata.get('config', '?')}); this model's is "
            f"{model.config.to_json()}"
        )
    if metadata.get("weights_sha256") != weights_fingerprint(model):
        raise CheckpointError(f"{path} was saved from a model with the same config but other weights (or dtype): "
                              "a state is only meaningful to the model that computed it")
    check_finite(tensors, path)
    config, device = model.config, model.device
    tensors = {key: value.to(device) for key, value in tensors.items()}
    committed = ModelState.from_tensors(tensors, COMMITTED, config.depth, len(config.recurrent_layers))
    positions = tensors["positions"].cpu()
    blocks = tuple((tensors[f"block.{i}.keys"], tensors[f"block.{i}.values"])
                   for i in range(config.depth) if f"block.{i}.keys" in tensors)
    try:
        return decode_state_from_parts(model, committed, positions, blocks, metadata.get("per_row") == "True")
    except (ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not hold a decode state this model can continue ({error})") from error
