"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and Weights & Biases (``brt train --log``).

``metrics.jsonl`` stays the record of a run; a tracker receives each record as it is appended (training lines,
validations with their sample, the final held-out score beside gzip's) and files it under one tag scheme:
``train/loss``, ``train/bpb``, ``train/lr``, ``train/tokens_per_s``, ... for training lines, ``val/bpb`` for
validations, ``held_out/bpb`` and ``held_out/gzip_bpb`` for the final score, ``sample`` for the samples (text).

A resumed run continues the same log: TensorBoard's writer purges what a killed run logged after the checkpoint
(``purge_step``), as ``metrics.jsonl`` is cut back; W&B continues the same run id (kept in the run folder), and
drops steps it has already seen, so no step is logged twice. Both are optional extras, imported only when asked
for: ``pip install 'block-recurrent[tensorboard]'`` / ``'block-recurrent[wandb]'``; W&B runs offline with
``WANDB_MODE=offline`` (``wandb sync`` uploads later).
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any, Protocol

from ..model.checks import check_choice

TENSORBOARD_DIR = "tensorboard"  # event files, under the run folder
WANDB_ID_FILE = "wandb-run-id"  # the W&B run a resumed run continues


class RunLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record under their tags (``val_bpb`` -> ``val/bpb``, ``lr`` -> ``train/lr``)."""
    tagged = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        for prefix in ("val", "held_out"):
            if key.startswith(prefix + "_"):
                tagged[f"{prefix}/{key[len(prefix) + 1:]}"] = float(value)
                break
        else:
            tagged[f"train/{key}"] = float(value)
    return tagged


def sample_text(record: dict[str, Any]) -> tuple[str, str] | None:
    """(prompt, continuation) of a validation record that holds a sample."""
    sample = record.get("sample")
    if not isinstance(sample, dict):
        return None
    return str(sample.get("prompt", "")), str(sample.get("continuation", ""))


class TensorBoardLogger:
    """Scalars and sample texts in TensorBoard event files under ``out_dir/tensorboard``."""

    def __init__(self, out_dir: Path, *, step: int, run_config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("--log tensorboard needs the tensorboard package: "
                              "pip install 'block-recurrent[tensorboard]'") from error
        # a resumed run (step > 0) purges the events a killed run wrote after its checkpoint
        self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", _markdown_code(_pretty(run_config)), 0)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        sample = sample_text(record)
        if sample is not None:
            prompt, continuation = sample
            self.writer.add_text("sample", _markdown_code(prompt) + "\n\ncontinued:\n\n" + _markdown_code(continuation),
                                 step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """The same records in a Weights & Biases run (offline with ``WANDB_MODE=offline``), files under out_dir."""

    def __init__(self, out_dir: Path, *, step: int, run_config: dict[str, Any]):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("--log wandb needs the wandb package: pip install 'block-recurrent[wandb]'") from error
        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        self.wandb = wandb
        # resume="allow": the same run id continues one run; W&B refuses steps below the one it has reached
        self.run = wandb.init(project="block-recurrent", name=out_dir.resolve().name, id=run_id, resume="allow",
                              dir=str(out_dir), config=run_config)
        self.samples: list[list[Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        data: dict[str, Any] = dict(scalars(record))
        sample = sample_text(record)
        if sample is not None:
            self.samples.append([int(record["step"]), *sample])
            data["sample"] = self.wandb.Table(columns=["step", "prompt", "continuation"], data=list(self.samples))
        if data:
            self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def logger_names(log: str) -> list[str]:
    """The trackers of a ``log`` setting: "none", or names from LOGGERS joined by commas."""
    return [] if log == "none" else [name.strip() for name in log.split(",")]


def check_log(name: str, log: Any) -> None:
    if not isinstance(log, str):
        raise TypeError(f"{name} must be a str, got {type(log).__name__}")
    for part in logger_names(log):
        check_choice(name, part, [*LOGGERS, "none"])


def open_loggers(log: str, out_dir: Path, *, step: int, run_config: dict[str, Any]) -> list[RunLogger]:
    """The trackers ``log`` names, opened for a run folder whose run stands at ``step`` (0: a new run)."""
    opened: list[RunLogger] = []
    try:
        for name in logger_names(log):
            opened.append(LOGGERS[name](Path(out_dir), step=step, run_config=run_config))
    except BaseException:
        for logger in opened:
            logger.close()
        raise
    return opened


def _pretty(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def _markdown_code(text: str) -> str:
    # TensorBoard renders text as Markdown: an indented block shows it verbatim
    return "\n".join("    " + line for line in text.split("\n"))
