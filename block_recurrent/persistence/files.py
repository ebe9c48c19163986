"""A checkpoint's files: each read with its recorded checksum checked, written durably, and a folder checked for
completeness before anything in it is trusted.

A folder is complete when every file its kind needs is there, and ``checksums.json`` is there and records every
file. A folder without ``checksums.json`` (written before checksums existed, or by another tool) can only be
checked for what its files say of themselves: that they parse, fit the model, and hold finite numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor

from .storage import MANIFEST_FILE, finish_file, read_manifest, write_text

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, pickled, or made for another model."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, cut short, non-finite, or differ from their recorded checksums."""


def refuse_pickles(directory: Path, weights_file: str) -> None:
    pickles = sorted(p.name for p in directory.iterdir()
                     if p.suffix in PICKLE_SUFFIXES and (p.suffix != ".bin" or "model" in p.name))
    if pickles and not (directory / weights_file).exists():
        raise CheckpointError(
            f"{directory} holds {', '.join(pickles)} (pickle files); block-recurrent never unpickles. "
            f"Convert the weights to {weights_file} with safetensors first"
        )


def check_complete(folder: Path, required: tuple[str, ...]) -> dict[str, str] | None:
    """The folder's recorded checksums, after checking that ``required`` files and every recorded file are there;
    None for a folder without ``checksums.json``. DamagedCheckpoint names what is missing."""
    if not folder.is_dir():
        raise DamagedCheckpoint(f"checkpoint folder {folder} is missing")
    missing = [name for name in required if not (folder / name).is_file()]
    sums = read_manifest(folder)
    if sums is not None:
        missing += [name for name in sorted(sums) if name not in required and not (folder / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"{folder} is incomplete: {', '.join(missing)} missing")
    if sums is None:
        return None
    unrecorded = [name for name in required if name not in sums]
    if unrecorded:
        problem = "is damaged" if not sums else f"records no checksum of {', '.join(unrecorded)}"
        raise DamagedCheckpoint(f"{folder / MANIFEST_FILE} {problem}")
    return sums


def read_bytes(path: Path) -> bytes:
    """A checkpoint file's bytes, checked against the sha256 its folder's manifest recorded (if it has one)."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DamagedCheckpoint(f"checkpoint file {path} is missing") from None
    sums = read_manifest(path.parent)
    if sums is not None and sums.get(path.name) != hashlib.sha256(raw).hexdigest():
        recorded = "no checksum recorded" if path.name not in sums else "its sha256 differs from the recorded one"
        raise DamagedCheckpoint(f"{path} is damaged ({recorded} in {MANIFEST_FILE})")
    return raw


def check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """Refuse tensors holding NaN or infinity: no checkpoint is ever written so (saving refuses them)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DamagedCheckpoint(f"{path} holds NaN or inf in {len(bad)} tensors (first: {bad[0]}); refusing it")


def read_tensors(path: Path, *, finite: bool = False) -> dict[str, Tensor]:
    """A safetensors file, with clear errors for a missing, pickled or damaged file (and with ``finite``, for a
    file holding NaN or infinity)."""
    raw = read_bytes(path)
    # safetensors: an 8-byte little-endian header length, then the JSON header (whose length may start with 0x80)
    header_ok = len(raw) > 8 and raw[8:9] == b"{" and 8 + int.from_bytes(raw[:8], "little") <= len(raw)
    if not header_ok and (raw[:1] == b"\x80" or raw[:2] == b"PK"):
        raise CheckpointError(f"{path} is a pickle (torch.save) file, not safetensors; refusing to load it")
    try:
        tensors = load_bytes(raw)
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{path} is damaged or not a safetensors file ({error})") from error
    if finite:
        check_finite(tensors, path)
    return tensors


def write_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    finish_file(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedCheckpoint(f"{path} is damaged (not valid JSON: {error})") from error


def write_json(data: Any, path: Path) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
