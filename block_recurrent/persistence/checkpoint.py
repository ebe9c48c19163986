"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A trained model (``save_pretrained``) is a folder with ``config.json`` and ``model.safetensors`` (the layout of
``huggingface_hub.PyTorchModelHubMixin``, so it can live on the Hub), plus ``tokenizer.json`` when the model
was trained with a ``tokenizers`` file, and ``checksums.json``. A training checkpoint ``step-00000100/`` adds:

- ``optimizer.safetensors`` (the optimiser's per-parameter tensors) and ``trainer.json`` (training config,
  step, data positions, optimiser hyper-parameters, which carried tensors exist),
- ``trainer.safetensors`` (the memories and states carried between steps, RNG states).

Every checkpoint is written to a temporary folder, fsynced and renamed into place (:mod:`.storage`), so a
crash mid-write never leaves a broken checkpoint behind; old ones are renamed out of sight before they are
deleted. Each records the sha256 of its files (``checksums.json``), checked whenever a file is read (see
:mod:`.files` for what counts as complete), and a training checkpoint its format number (``trainer.json``
``"format"``), refused when unknown. Weights holding NaN or infinity are refused wherever they are read.

Every reader of a run folder (resume, ``brt eval``, ``brt generate``, :func:`from_pretrained`) takes the newest
complete checkpoint, says which newer ones it skipped and why, and looks again when the run's rotation removes
the one it was reading (:func:`newest_checkpoint`).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from torch import Tensor

from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel
from .budget import check_model_fits
from .files import (
    CheckpointError, DamagedCheckpoint, check_complete, check_finite, read_json, read_tensors, refuse_pickles,
    write_json, write_tensors,
)
from .optimizer_state import optimizer_from_tensors, optimizer_to_tensors
from .storage import MANIFEST_FILE, atomic_directory, discard_directory, finish_file, write_manifest

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_JSON = "trainer.json"
TRAINER_TENSORS = "trainer.safetensors"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)
TRAINING_FILES = (*MODEL_FILES, OPTIMIZER_FILE, TRAINER_JSON, TRAINER_TENSORS)
FORMAT = 1  # of a training checkpoint (trainer.json "format"); a reader refuses any other
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# a reader that keeps losing its checkpoint to the run's rotation looks again this many times
ROTATION_RETRIES = 20

__all__ = ["CheckpointError", "DamagedCheckpoint", "TrainingCheckpoint", "from_pretrained", "latest_checkpoint",
           "load_pretrained", "load_training_checkpoint", "newest_checkpoint", "newest_intact_checkpoint",
           "optimizer_from_tensors", "optimizer_to_tensors", "push_to_hub", "save_pretrained",
           "save_training_checkpoint", "step_directories"]

T = TypeVar("T")


# a folder's model: config and weights


def read_config(directory: Path) -> BlockRecurrentConfig:
    try:
        return BlockRecurrentConfig.from_saved(read_json(directory / CONFIG_FILE))
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
    """Load ``model.safetensors`` into ``model``, naming missing, unexpected, mis-shaped or non-finite tensors."""
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
    check_finite(tensors, path)
    model.load_state_dict(tensors)


def _required_files(folder: Path) -> tuple[str, ...]:
    return TRAINING_FILES if _STEP_DIR.match(folder.name) else MODEL_FILES


def _unverified(folder: Path) -> str:
    return (f"{folder} has no {MANIFEST_FILE}, so damage to its files cannot be detected; checking instead that "
            "they parse, fit the model and hold finite weights")


def _load_model(folder: Path, device: torch.device, *, unverified: bool = True) -> BlockRecurrentModel:
    """The model of one checkpoint folder, after checking that the folder is complete (``unverified``: or
    has no checksums at all, with a warning)."""
    refuse_pickles(folder, WEIGHTS_FILE)
    if check_complete(folder, _required_files(folder)) is None:
        if not unverified:
            raise _NoChecksums(f"{folder} has no {MANIFEST_FILE}")
        warnings.warn(_unverified(folder), stacklevel=3)
    config = read_config(folder)
    check_model_fits(config, device, str(folder / CONFIG_FILE))
    model = BlockRecurrentModel(config)
    load_weights(model, folder / WEIGHTS_FILE)
    return model


class _NoChecksums(DamagedCheckpoint):
    """A run's checkpoint without checksums.json: used only when no newer complete one is left."""


# trained models: a folder of config.json + model.safetensors (Hub compatible)


def save_pretrained(model: BlockRecurrentModel, directory: str | Path, *, tokenizer_file: str | Path | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and ``tokenizer.json``) and their checksums atomically."""
    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")
    directory = Path(directory)
    check_finite(model.state_dict(), directory / WEIGHTS_FILE)

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


def write_model_files(model: BlockRecurrentModel, directory: Path) -> None:
    """``config.json``, ``model.safetensors`` and their checksums, written into an existing ``directory`` in place
    (for writers that own the folder, as the Hub mixin's ``save_pretrained`` does; :func:`save_pretrained` is the
    atomic one)."""
    check_finite(model.state_dict(), directory / WEIGHTS_FILE)
    _write_model(model, directory, None)
    write_manifest(directory, names=(CONFIG_FILE, WEIGHTS_FILE))  # only ours: the folder may hold the user's files


def load_pretrained(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", revision: str | None = None
) -> tuple[BlockRecurrentModel, Path]:
    """(model, the folder it came from): a ``save_pretrained`` folder, a training checkpoint, a run folder (its
    newest complete checkpoint, see :func:`newest_checkpoint`) or a Hub repository id."""
    if not str(name_or_path):
        raise CheckpointError("checkpoint must name a folder or a Hub repository id, got an empty string")
    device = torch.device(device)
    directory = Path(name_or_path)
    if not directory.exists():
        directory = _download(str(name_or_path), revision)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a folder")
    if (directory / CONFIG_FILE).exists() or _STEP_DIR.match(directory.name):
        model = _load_model(directory, device)
    else:
        refuse_pickles(directory, WEIGHTS_FILE)
        model, directory = newest_checkpoint(
            directory, lambda path, trusted: _load_model(path, device, unverified=not trusted))
    return model.to(device).eval(), directory


def from_pretrained(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", revision: str | None = None
) -> BlockRecurrentModel:
    """A model from a local folder (``save_pretrained``, a training checkpoint, or a run folder's newest complete
    checkpoint) or a Hub repository id."""
    return load_pretrained(name_or_path, device=device, revision=revision)[0]


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
    patterns = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST_FILE]
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


def _atomic_write(final: Path, fill, *, manifest: bool = True) -> None:
    """:func:`atomic_directory`, with a full disk or a failing device as a CheckpointError."""
    try:
        atomic_directory(final, fill, manifest=manifest)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"could not write {final}: {error}; the earlier checkpoints are unchanged") from error


def step_directories(run_dir: Path) -> list[Path]:
    """The step folders of a run, oldest first (complete or not: see :func:`newest_checkpoint`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest step folder of a run, whatever it holds."""
    found = step_directories(Path(run_dir))
    return found[-1] if found else None


def _identity(path: Path, *, modified: bool = False) -> tuple[int, ...] | None:
    """Which folder ``path`` is (and with ``modified``, when its entries last changed); None when it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns) if modified else (stat.st_dev, stat.st_ino)


def newest_checkpoint(run_dir: str | Path, load: Callable[[Path, bool], T], *, verb: str = "reading"
                      ) -> tuple[T, Path]:
    """``load(folder, trusted)`` of the newest step folder of a run that loads, and that folder.

    Folders that fail with DamagedCheckpoint (incomplete, damaged, non-finite) are skipped, named in one warning
    with their reasons. A folder without checksums.json is skipped too (``trusted`` True), unless no complete
    one is left: then the newest of those is loaded with ``trusted`` False. A folder that disappears or is
    replaced while it is read was removed by the run's rotation, not damaged: the run is listed again, as it is
    when the run folder changed while it was listed (a listing is no snapshot: it can miss both the folder just
    rotated away and the one just written).
    """
    run_dir = Path(run_dir)
    skipped: dict[Path, str] = {}
    without_checksums: list[Path] = []
    tried: dict[Path, tuple[int, ...]] = {}
    for _ in range(ROTATION_RETRIES):
        rotated, listed = False, _identity(run_dir, modified=True)
        for path in reversed(step_directories(run_dir)):
            identity = _identity(path)
            if identity is None or tried.get(path) == identity:
                continue
            tried[path] = identity
            try:
                result = load(path, True)
            except _NoChecksums:
                without_checksums.append(path)
                skipped[path] = f"no {MANIFEST_FILE}"
                continue
            except (DamagedCheckpoint, FileNotFoundError, NotADirectoryError) as error:
                if _identity(path) != identity:  # removed or replaced by the writer while it was read
                    skipped.pop(path, None)
                    rotated = True
                    break
                skipped[path] = str(error)
                continue
            return _found(run_dir, result, path, skipped, verb)
        if not rotated and _identity(run_dir, modified=True) == listed:
            break
    for path in without_checksums:  # newest first; the loader warns that it could not verify the files
        try:
            result = load(path, False)
        except DamagedCheckpoint as error:
            skipped[path] = f"no {MANIFEST_FILE}, and {error}"
            continue
        return _found(run_dir, result, path, {p: why for p, why in skipped.items() if p != path}, verb,
                      "the newest checkpoint that reads (none is complete)")
    if not tried:
        raise CheckpointError(f"{run_dir} holds no checkpoint ({CONFIG_FILE} or step-XXXXXXXX folders)")
    reasons = "; ".join(f"{p.name} ({why})" for p, why in skipped.items()) or "every one was removed while read"
    raise DamagedCheckpoint(f"no complete checkpoint in {run_dir}: {reasons}")


def _found(run_dir: Path, result: T, path: Path, skipped: dict[Path, str], verb: str,
           what: str = "the newest complete checkpoint") -> tuple[T, Path]:
    newer = {p: why for p, why in skipped.items() if p.name > path.name}
    if newer:
        warnings.warn(f"{verb} {path.name}, {what} in {run_dir}; skipped: "
                      + "; ".join(f"{p.name} ({why})" for p, why in newer.items()), stacklevel=3)
    return result, path


@dataclass
class TrainingCheckpoint:
    """What a training checkpoint holds, loaded into memory (tensors on the CPU)."""

    path: Path
    config: BlockRecurrentConfig
    weights: dict[str, Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    tensors: dict[str, Tensor]
    passed_over: tuple[Path, ...] = ()  # newer step folders of the run found incomplete or damaged


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

    _atomic_write(final, fill)
    for old in step_directories(run_dir)[:-keep_last]:
        discard_directory(old)  # out of sight first: a reader never sees it half deleted
    return final


def _read_training(path: Path, trusted: bool = False) -> TrainingCheckpoint:
    """One step folder's training checkpoint, every part read, checked and finite."""
    refuse_pickles(path, WEIGHTS_FILE)
    if check_complete(path, TRAINING_FILES) is None:
        if trusted:
            raise _NoChecksums(f"{path} has no {MANIFEST_FILE}")
        warnings.warn(_unverified(path), stacklevel=3)
    trainer = read_json(path / TRAINER_JSON)
    where = path / TRAINER_JSON
    if not isinstance(trainer, dict) or "optimizer" not in trainer:
        raise DamagedCheckpoint(f"{where} is damaged (no step or optimizer entry)")
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{where} has checkpoint format {trainer.get('format')!r}; this version "
                              f"of block-recurrent reads format {FORMAT} only")
    step = trainer.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DamagedCheckpoint(f"{where} is damaged (step must be an int >= 0, got {step!r})")
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise DamagedCheckpoint(f"{where} is damaged (step {step} inside the folder of step {int(named.group(1))})")
    optimizer = trainer.pop("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list):
        raise DamagedCheckpoint(f"{where} is damaged (its optimizer entry has no param_groups)")
    optim = {"tensors": read_tensors(path / OPTIMIZER_FILE, finite=True), "json": optimizer}
    return TrainingCheckpoint(path, read_config(path), read_tensors(path / WEIGHTS_FILE, finite=True), optim, trainer,
                              read_tensors(path / TRAINER_TENSORS))


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Load a ``step-XXXXXXXX`` folder, or a run folder's newest complete one, checking that every part is
    readable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    if not _STEP_DIR.match(path.name) and not (path / CONFIG_FILE).exists():
        return newest_intact_checkpoint(path)
    if not (path / TRAINER_JSON).exists() and not _STEP_DIR.match(path.name):
        raise CheckpointError(f"{path} is a trained model, not a training checkpoint (no {TRAINER_JSON})")
    return _read_training(path)


def newest_intact_checkpoint(run_dir: str | Path, check: Callable[[TrainingCheckpoint], None] | None = None
                             ) -> TrainingCheckpoint:
    """The newest training checkpoint of a run whose files are all present, verify and pass ``check`` (which
    raises DamagedCheckpoint for a record it cannot use); the newer ones it skipped are in ``passed_over``."""
    run_dir = Path(run_dir)
    if not step_directories(run_dir):
        raise CheckpointError(f"resume: {run_dir} holds no checkpoint to resume from")

    def load(path: Path, trusted: bool) -> TrainingCheckpoint:
        saved = _read_training(path, trusted)
        if check is not None:
            check(saved)
        return saved

    saved, path = newest_checkpoint(run_dir, load, verb="resuming from")
    saved.passed_over = tuple(p for p in step_directories(run_dir) if p.name > path.name)
    return saved
