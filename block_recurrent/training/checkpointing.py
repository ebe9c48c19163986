"""A run's checkpoints as the trainer sees them: the run folder (created, locked once, cleared of what a killed
run left), the record a checkpoint keeps beside the model (``trainer.json``, checked like every other input),
whether a checkpoint belongs to this run (settings, data), and the configs a resumed run continues with.

The Trainer (:mod:`.trainer`) saves and restores through these; :func:`open_resumed` is how a run is continued
from its folder: the folder is locked before its newest complete checkpoint is read, so a second process can
neither write it meanwhile nor read it half replaced.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..model.config import BlockRecurrentConfig
from ..persistence.checkpoint import (
    TOKENIZER_FILE, TRAINER_JSON, CheckpointError, DamagedCheckpoint, TrainingCheckpoint, check_same_config,
    newest_intact_checkpoint,
)
from ..persistence.storage import RunFolderLock, lock_run_folder, prepare_folder, remove_leftovers
from .data import BATCHERS, Document
from .train_config import TrainConfig


# the run folder: one lock, taken here only


@dataclass
class RunFolder:
    """A run folder this process writes: created, locked by rank 0 until :meth:`close` (or process death)."""

    path: Path
    _lock: RunFolderLock | None = None

    @classmethod
    def open(cls, path: str | Path, *, main: bool = True, resume: bool = False) -> "RunFolder":
        """Create and lock the folder (``main``: rank 0; other ranks only name it) and clear what a killed run
        left half-written. With ``resume`` the folder must already exist."""
        path = Path(path)
        if resume and not path.is_dir():
            raise ValueError(f"resume: {path} holds no checkpoint to resume from")
        if not main:
            return cls(path)
        prepare_folder(path)
        folder = cls(path, lock_run_folder(path))
        cleared = remove_leftovers(path)
        if cleared:
            warnings.warn(f"{path}: cleared what an interrupted run left: {', '.join(cleared)}", stacklevel=3)
        return folder

    def set_aside(self, folders: tuple[Path, ...]) -> None:
        """Rename step folders a resume skipped to ``NAME.damaged`` (kept for a look), so that the run's newest
        step folder is again one it can read, and the rotation never counts them."""
        if self._lock is None:
            return  # only the writer renames
        for folder in folders:
            aside = folder.with_name(folder.name + ".damaged")
            if aside.exists():
                aside = folder.with_name(f"{folder.name}.damaged-{os.getpid()}")
            folder.rename(aside)
            warnings.warn(f"{folder} is incomplete or damaged: renamed to {aside.name}", stacklevel=4)

    def close(self) -> None:
        """Let go of the lock (released once no holder in this process references it)."""
        self._lock = None


# trainer.json: every field checked before it is used


def _where(saved: TrainingCheckpoint) -> Path:
    return saved.path / TRAINER_JSON


def _int(saved: TrainingCheckpoint, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DamagedCheckpoint(f"{_where(saved)} is damaged ({name} must be an int >= {minimum}, got {value!r})")
    return value


def saved_settings(saved: TrainingCheckpoint) -> TrainConfig:
    """The training settings a checkpoint was written with (settings it predates take their values of then)."""
    settings = saved.trainer.get("train_config")
    if not isinstance(settings, dict):
        raise DamagedCheckpoint(f"{_where(saved)} is damaged (no train_config)")
    try:
        return TrainConfig.from_dict({**TrainConfig.LEGACY, **settings})
    except (TypeError, ValueError) as error:
        raise DamagedCheckpoint(f"{_where(saved)} is damaged (train_config: {error})") from None


def check_record(saved: TrainingCheckpoint) -> None:
    """Raise DamagedCheckpoint naming the first field of ``trainer.json`` that is missing, of the wrong type, out
    of range, or inconsistent with its folder (the step, checked on load) and the rest of the run."""
    where, record = _where(saved), saved.trainer
    config = saved_settings(saved)
    step = record["step"]
    world_size = _int(saved, "world_size", record.get("world_size", 1), 1)
    rows = config.batch_size * config.grad_accum * world_size
    tokens = _int(saved, "tokens_seen", record.get("tokens_seen", 0), 0)
    if tokens > step * rows * config.segments * saved.config.max_seq_len:
        raise DamagedCheckpoint(f"{where} is damaged (tokens_seen {tokens} is more than {step} steps of {rows} rows "
                                "can have read)")
    elapsed = record.get("elapsed_s", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) or elapsed < 0:
        raise DamagedCheckpoint(f"{where} is damaged (elapsed_s must be a finite number >= 0, got {elapsed!r})")

    data = record.get("data")
    if not isinstance(data, dict) or data.get("mode") not in BATCHERS:
        raise DamagedCheckpoint(f"{where} is damaged (no data positions)")
    if data["mode"] != config.mode or data.get("total_rows") != rows or data.get("row_offset") != 0:
        raise DamagedCheckpoint(
            f"{where} is damaged (data: mode {data['mode']!r}, total_rows {data.get('total_rows')!r}, row_offset "
            f"{data.get('row_offset')!r}; its settings give mode {config.mode!r}, {rows} rows from row 0)")
    if data["mode"] == "stream" and (not isinstance(data.get("positions"), list) or len(data["positions"]) != rows):
        raise DamagedCheckpoint(f"{where} is damaged (data positions: one per row of the {rows} expected)")
    if data["mode"] == "crop" and data.get("step") != step:
        raise DamagedCheckpoint(f"{where} is damaged (data step {data.get('step')!r} differs from step {step})")

    source = record.get("data_source")  # (absent in runs saved before data fingerprints)
    if source is not None and not (isinstance(source, dict) and isinstance(source.get("paths"), dict)):
        raise DamagedCheckpoint(f"{where} is damaged (data_source has no paths)")
    tokenizer = record.get("tokenizer", {"kind": "bytes"})
    expected = "bytes" if config.tokenizer is None else "tokenizers"
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") != expected:
        raise DamagedCheckpoint(f"{where} is damaged (tokenizer must be of kind {expected!r} for its settings' "
                                f"tokenizer {config.tokenizer!r}, got {tokenizer!r})")
    if expected == "tokenizers" and not (saved.path / TOKENIZER_FILE).is_file():
        raise DamagedCheckpoint(f"{saved.path} is incomplete: {TOKENIZER_FILE} missing")


# does a checkpoint belong to this run? Its model, its settings, its data


def fingerprint(documents: Sequence[Document]) -> dict[str, Any]:
    """What identifies a document list for a resumed run: the count, the bytes, a sha256 of the (name, size)
    pairs, and ``content``, a sha256 of the (name, sha256 of the text) pairs, which any edit changes (one that
    keeps a file's size too). Hashed from the texts already in memory: no file is read a second time."""
    names, content = hashlib.sha256(), hashlib.sha256()
    total = 0
    for document in sorted(documents, key=lambda d: d.name):
        raw = document.text.encode("utf-8")
        total += len(raw)
        names.update(f"{document.name}\0{len(raw)}\n".encode("utf-8"))
        content.update(f"{document.name}\0{hashlib.sha256(raw).hexdigest()}\n".encode("utf-8"))
    return {"documents": len(documents), "bytes": total, "sha256": names.hexdigest()[:16],
            "content": content.hexdigest()[:16]}


def same_documents(saved: Any, now: dict[str, Any]) -> bool:
    """Whether a fingerprint saved by a run equals ``now`` in every entry both have (one saved before
    ``content`` existed is compared by names and sizes)."""
    if not isinstance(saved, dict):
        return False
    shared = [key for key in now if key in saved]
    return bool(shared) and all(saved[key] == now[key] for key in shared)


def check_same_run(saved: TrainingCheckpoint, model_config: BlockRecurrentConfig, config: TrainConfig,
                   data_source: dict[str, Any]) -> None:
    """Refuse (or with allow_data_change, warn about) a checkpoint of another model, other settings or other
    data (its resolved paths, its documents' names, sizes and contents)."""
    check_same_config(saved.config, model_config, saved.path)
    settings, mine = saved_settings(saved).to_dict(), config.to_dict()
    fixed = [k for k in sorted(mine) if k not in TrainConfig.RESUMABLE + TrainConfig.PATHS]
    differs = [f"{k}: checkpoint {settings[k]!r}, now {mine[k]!r}" for k in fixed if settings[k] != mine[k]]
    if differs:
        raise CheckpointError(f"cannot resume {saved.path} with other training settings ({'; '.join(differs)})")
    source = saved.trainer.get("data_source")
    if source is None:  # written before data fingerprints: its paths, resolved from here
        source = {"paths": {k: resolved_path(settings.get(k)) for k in TrainConfig.PATHS}}
    changed = [f"{k}: checkpoint {source['paths'].get(k)}, now {v}" for k, v in data_source["paths"].items()
               if source["paths"].get(k) != v]
    changed += [f"{k} documents: checkpoint {_described(source[k])}, now {_described(data_source[k])}"
                for k in ("train", "validation") if k in source and not same_documents(source[k], data_source[k])]
    if changed and config.allow_data_change:
        warnings.warn(f"resuming {saved.path} on changed data ({'; '.join(changed)})", stacklevel=4)
    elif changed:
        raise CheckpointError(f"cannot resume {saved.path}: the data changed ({'; '.join(changed)}); "
                              "pass allow_data_change (--allow-data-change) to continue anyway")


def rank_data_state(saved: TrainingCheckpoint, row_offset: int, rows: int) -> dict[str, Any]:
    """The saved data state (every rank's rows) cut to this rank's ``rows`` rows from ``row_offset``."""
    data = dict(saved.trainer["data"])
    if data["mode"] == "stream":
        data["positions"] = data["positions"][row_offset : row_offset + rows]
    return data


def _described(fingerprint: Any) -> str:
    try:
        described = f"{fingerprint['documents']} documents, {fingerprint['bytes']} bytes, sha256 {fingerprint['sha256']}"
    except (TypeError, KeyError):
        return repr(fingerprint)
    return described + (f", content {fingerprint['content']}" if "content" in fingerprint else "")


def resolved_path(path: str | None) -> str | None:
    # "./data/d", "data/d/" and "/abs/data/d" name one folder; a run resumed elsewhere names another
    return None if path is None else os.path.realpath(path)


# continuing a run


def resume_configs(run: str | Path | TrainingCheckpoint, **overrides: Any) -> tuple[BlockRecurrentConfig, TrainConfig]:
    """The model and training configs of a run (its newest complete checkpoint, or ``run`` when loaded), with
    ``overrides``. Pass the same checkpoint to :func:`~.trainer.train` as ``resume`` so it is read once.

    Overriding a setting outside ``TrainConfig.RESUMABLE`` is refused when the run is restored.
    """
    saved = run if isinstance(run, TrainingCheckpoint) else newest_intact_checkpoint(run, check_record)
    settings = saved_settings(saved).to_dict()
    out_dir = overrides.pop("out_dir", saved.path.parent if isinstance(run, TrainingCheckpoint) else run)
    try:
        # allow_data_change holds for one invocation: a run resumed once on changed data stays checked after
        config = TrainConfig.from_dict({**settings, "allow_data_change": False, **overrides, "out_dir": str(out_dir)})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{saved.path}: cannot resume with these settings ({error})") from error
    return saved.config, config


def open_resumed(out_dir: str | Path, *, main: bool = True, model_config: BlockRecurrentConfig | None = None,
                 **overrides: Any) -> tuple[RunFolder, TrainingCheckpoint, BlockRecurrentConfig, TrainConfig]:
    """Lock a run folder, then read its newest complete checkpoint: (folder, checkpoint, model config, training
    config with ``overrides``). ``model_config``, when given, must be the run's (every differing field is named)."""
    if not str(out_dir):
        raise ValueError("out_dir must be a non-empty str, got ''")
    folder = RunFolder.open(out_dir, main=main, resume=True)
    try:
        saved = newest_intact_checkpoint(folder.path, check_record)
        saved_model, config = resume_configs(saved, out_dir=str(out_dir), **overrides)
        if model_config is not None:
            check_same_config(saved_model, model_config, saved.path)
    except BaseException:
        folder.close()
        raise
    return folder, saved, saved_model, config
