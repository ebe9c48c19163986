"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A trained model (``save_pretrained``) is a folder with ``config.json`` and ``model.safetensors`` (the layout of
``huggingface_hub.PyTorchModelHubMixin``, so it can live on the Hub), plus ``tokenizer.json`` when the model
was trained with a ``tokenizers`` file. A training checkpoint ``step-00000100/`` adds:

- ``optimizer.safetensors`` (the optimiser's per-parameter tensors) and ``trainer.json`` (training config,
  step, data positions, optimiser hyper-parameters, which carried tensors exist),
- ``trainer.safetensors`` (the memories and states carried between steps, RNG states).

Every checkpoint is written to a temporary folder, fsynced and renamed into place (:mod:`.storage`), so a
crash mid-write never leaves a broken checkpoint behind. A training checkpoint also records the sha256 of each
of its files (``checksums.json``), checked whenever a file is read, and its format number (``trainer.json``
``"format"``), refused when unknown. Loading refuses pickled files and names what is wrong with a damaged one;
:func:`newest_intact_checkpoint` steps back past damaged checkpoints of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor

from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel
from .storage import MANIFEST_FILE, atomic_directory, finish_file, read_manifest, write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_JSON = "trainer.json"
TRAINER_TENSORS = "trainer.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FORMAT = 1  # of a training checkpoint (trainer.json "format"); a reader refuses any other
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, pickled, or made for another model."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, cut short, or differ from their recorded checksums."""


# reading and writing single files


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir()
                     if p.suffix in PICKLE_SUFFIXES and (p.suffix != ".bin" or "model" in p.name))
    if pickles and not (directory / WEIGHTS_FILE).exists():
        raise CheckpointError(
            f"{directory} holds {', '.join(pickles)} (pickle files); block-recurrent never unpickles. "
            f"Convert the weights to {WEIGHTS_FILE} with safetensors first"
        )


def read_bytes(path: Path) -> bytes:
    """A checkpoint file's bytes, checked against the sha256 its folder's manifest recorded (if it has one)."""
    if not path.is_file():
        raise DamagedCheckpoint(f"checkpoint file {path} is missing")
    raw = path.read_bytes()
    sums = read_manifest(path.parent)
    if sums is not None and sums.get(path.name) != hashlib.sha256(raw).hexdigest():
        recorded = "no checksum recorded" if path.name not in sums else "its sha256 differs from the recorded one"
        raise DamagedCheckpoint(f"{path} is damaged ({recorded} in {MANIFEST_FILE})")
    return raw


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file, with clear errors for a missing, pickled or damaged file."""
    raw = read_bytes(path)
    # safetensors: an 8-byte little-endian header length, then the JSON header (whose length may start with 0x80)
    header_ok = len(raw) > 8 and raw[8:9] == b"{" and 8 + int.from_bytes(raw[:8], "little") <= len(raw)
    if not header_ok and (raw[:1] == b"\x80" or raw[:2] == b"PK"):
        raise CheckpointError(f"{path} is a pickle (torch.save) file, not safetensors; refusing to load it")
    try:
        return load_bytes(raw)
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{path} is damaged or not a safetensors file ({error})") from error


def write_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    finish_file(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedCheckpoint(f"{path} is damaged (not valid JSON: {error})") from error


def write_json(data: Any, path: Path) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_config(directory: Path) -> BlockRecurrentConfig:
    try:
        data = read_json(directory / CONFIG_FILE)
        if isinstance(data, dict):
            # a checkpoint's config holds every field of its day: one without gate_projection was written
            # before that option existed, when every gate had its own projection
            data.setdefault("gate_projection", True)
        return BlockRecurrentConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid model config: {error}") from error


def check_same_config(saved: BlockRecurrentConfig, expected: BlockRecurrentConfig, where: Path) -> None:
    """Raise naming every field where a checkpoint's config differs from the one asked for."""
    a, b = saved.to_dict(), expected.to_dict()
    diffs = [f"{k}: checkpoint {a[k]!r}, requested {b[k]!r}" for k in sorted(a) if a[k] != b[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {where} was made for another model config ({'; '.join(diffs)})")


def load_weights(model: BlockRecurrentModel, path: Path) -> None:
    """Load ``model.safetensors`` into ``model``, naming missing, unexpected or mis-shaped tensors."""
    load_state(model, read_tensors(path), path)


def load_state(model: BlockRecurrentModel, tensors: dict[str, Tensor], path: Path) -> None:
    """``model.load_state_dict(tensors)``, with a CheckpointError naming what does not fit."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}"
        )
    model.load_state_dict(tensors)


# trained models: a folder of config.json + model.safetensors (Hub compatible)


def save_pretrained(model: BlockRecurrentModel, directory: str | Path, *, tokenizer_file: str | Path | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and ``tokenizer.json``) atomically to ``directory``."""
    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        _write_model(model, tmp, tokenizer_file)

    _atomic_write(directory, fill)
    return directory


def _write_model(model: BlockRecurrentModel, directory: Path, tokenizer_file: str | Path | None) -> None:
    write_json(model.config.to_dict(), directory / CONFIG_FILE)
    write_tensors(model.state_dict(), directory / WEIGHTS_FILE)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
        finish_file(directory / TOKENIZER_FILE)


def from_pretrained(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", revision: str | None = None
) -> BlockRecurrentModel:
    """A model from a local folder (``save_pretrained`` or a training checkpoint) or a Hub repository id."""
    directory = Path(name_or_path)
    if not directory.exists():
        directory = _download(str(name_or_path), revision)
    directory = resolve_checkpoint(directory)
    model = BlockRecurrentModel(read_config(directory))
    load_weights(model, directory / WEIGHTS_FILE)
    return model.to(device).eval()


def _looks_local(name: str) -> bool:
    """A name that can only be meant as a local path (so a missing one is a typo, not a Hub repository id)."""
    separators = {"/", os.sep}
    parent = os.path.dirname(name.rstrip("".join(separators)))
    return (name.startswith((".", "~", *separators)) or name.endswith(tuple(separators))
            or sum(name.count(s) for s in separators) > 1 or (parent not in ("", ".") and os.path.isdir(parent)))


def _download(repo_id: str, revision: str | None) -> Path:
    if _looks_local(repo_id):
        raise CheckpointError(f"checkpoint {repo_id}: no such folder")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"{repo_id} is neither a local folder nor a Hub repository id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError("loading from the Hub needs huggingface_hub: pip install 'block-recurrent[hf]'") from error
    patterns = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def push_to_hub(model: BlockRecurrentModel, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Upload a ``save_pretrained`` folder to the Hub (needs huggingface_hub and network); returns the URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "model")
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "model")))


# training checkpoints: step-XXXXXXXX folders in a run folder


def _atomic_write(final: Path, fill, *, manifest: bool = False) -> None:
    """:func:`atomic_directory`, with a full disk or a failing device as a CheckpointError."""
    try:
        atomic_directory(final, fill, manifest=manifest)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"could not write {final}: {error}; the earlier checkpoints are unchanged") from error


def step_directories(run_dir: Path) -> list[Path]:
    """Complete training checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = step_directories(Path(run_dir))
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A folder holding a model: itself, or for a run folder its latest checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    if not (path / CONFIG_FILE).exists():
        latest = latest_checkpoint(path)
        if latest is None:
            _refuse_pickles(path)
            raise CheckpointError(f"{path} holds no checkpoint ({CONFIG_FILE} or step-XXXXXXXX folders)")
        path = latest
    _refuse_pickles(path)
    return path


@dataclass
class TrainingCheckpoint:
    """What a training checkpoint holds, loaded into memory (tensors on the CPU)."""

    path: Path
    config: BlockRecurrentConfig
    weights: dict[str, Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    tensors: dict[str, Tensor]
    passed_over: tuple[Path, ...] = ()  # newer checkpoints of the run found damaged (newest_intact_checkpoint)


def save_training_checkpoint(
    run_dir: str | Path, step: int, *, model: BlockRecurrentModel, optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any], tensors: dict[str, Tensor], keep_last: int = 3, tokenizer_file: str | Path | None = None,
) -> Path:
    """Write ``run_dir/step-{step:08d}`` atomically, then delete all but the newest ``keep_last``.

    Refused (CheckpointError, nothing written) when a weight or optimiser tensor is NaN or infinite: a
    checkpoint is always one a run can continue from.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step:08d}"
    optim_tensors, optim_json = optimizer_to_tensors(optimizer)
    for kind, named in (("weight", model.state_dict()), ("optimizer tensor", optim_tensors)):
        bad = [name for name, t in named.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"step {step}: not saved, {len(bad)} {kind}s hold NaN or inf (first: {bad[0]})")

    def fill(tmp: Path) -> None:
        _write_model(model, tmp, tokenizer_file)
        write_tensors(optim_tensors, tmp / OPTIMIZER_FILE)
        write_tensors(tensors, tmp / TRAINER_TENSORS)
        write_json({**trainer, "format": FORMAT, "step": step, "optimizer": optim_json}, tmp / TRAINER_JSON)

    _atomic_write(final, fill, manifest=True)
    for old in step_directories(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Load a ``step-XXXXXXXX`` folder (or a run folder's latest), checking that every part is readable."""
    path = resolve_checkpoint(path)
    if not (path / TRAINER_JSON).exists():
        raise CheckpointError(f"{path} is a trained model, not a training checkpoint (no {TRAINER_JSON})")
    trainer = read_json(path / TRAINER_JSON)
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int) or "optimizer" not in trainer:
        raise DamagedCheckpoint(f"{path / TRAINER_JSON} is damaged (no step or optimizer entry)")
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{path / TRAINER_JSON} has checkpoint format {trainer.get('format')!r}; this version "
                              f"of block-recurrent reads format {FORMAT} only")
    optimizer = trainer.pop("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list):
        raise DamagedCheckpoint(f"{path / TRAINER_JSON} is damaged (its optimizer entry has no param_groups)")
    optim = {"tensors": read_tensors(path / OPTIMIZER_FILE), "json": optimizer}
    return TrainingCheckpoint(
        path, read_config(path), read_tensors(path / WEIGHTS_FILE), optim, trainer, read_tensors(path / TRAINER_TENSORS)
    )


def newest_intact_checkpoint(run_dir: str | Path) -> TrainingCheckpoint:
    """The newest checkpoint of a run whose files are all present and match their checksums.

    Each damaged checkpoint passed over is named in a warning; a CheckpointError when none is intact.
    """
    found = step_directories(Path(run_dir))
    if not found:
        raise CheckpointError(f"resume: {run_dir} holds no checkpoint to resume from")
    problems = []
    for path in reversed(found):
        try:
            saved = load_training_checkpoint(path)
        except DamagedCheckpoint as error:
            problems.append(str(error))
            continue
        if problems:
            warnings.warn(f"resuming from {path.name}, the newest intact checkpoint; passed over: "
                          + "; ".join(problems), stacklevel=2)
        saved.passed_over = tuple(p for p in found if p.name > path.name)
        return saved
    raise DamagedCheckpoint(f"no intact checkpoint in {run_dir}: " + "; ".join(problems))


# optimiser state: tensors to safetensors, the rest to JSON


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
