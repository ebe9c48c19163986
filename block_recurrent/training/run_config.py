"""Run files: ``brt train --config run.toml``, and the ``run.toml`` every run folder holds to repeat its run.

A run file is TOML. Its top-level keys are the options of ``brt train`` with underscores (``max_steps = 600``,
``preset = "tiny"``, ``recipe = "hour"``, ``model_config = "model.json"``, ``resume = true``); a ``[model]`` table
holds model config fields: the whole architecture alone, or the fields a preset (or a model config file) is
changed in. Options given on the command line win over the file; a model chosen on the command line (``--preset``,
``--model-config``, ``--recipe``) replaces the file's choice and its ``[model]`` table.

The run folder's ``run.toml`` holds every training setting and the whole model config, with the data paths
resolved, so ``brt train --config runs/x/run.toml --out-dir runs/y`` trains the same weights (on the CPU; a GPU's
kernels are not bitwise deterministic).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..model.config import BlockRecurrentConfig
from ..persistence.storage import replace_file
from .train_config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

RUN_FILE = "run.toml"
# keys that choose the model (at most one of the first three); [model] changes or replaces it
MODEL_KEYS = ("preset", "model_config", "recipe")


# reading


def read_text_input(path: str | Path, where: str) -> str:
    """The UTF-8 text of a file a user named (``-``: standard input), or a one-line ValueError naming ``where``."""
    try:
        return sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except OSError as error:
        raise ValueError(f"{where}: {error.strerror}") from None


def read_run_file(path: str | Path) -> dict[str, Any]:
    """A run file's settings: option names (underscores) -> values, and "model" -> the [model] table.

    Raises ValueError naming the file (and the key) for a missing file, bad TOML, an unknown key or a value of
    the wrong kind.
    """
    path = Path(path)
    where = f"--config {path}"
    text = read_text_input(path, where)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{where} is not valid TOML ({error})") from None
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    train_fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    known = set(train_fields) | set(MODEL_KEYS) | {"model", "resume"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)} (the keys are brt train's options, with "
                         "underscores, and a [model] table)")
    chosen = [key for key in MODEL_KEYS if key in settings]
    if len(chosen) > 1:
        raise ValueError(f"{where}: {' and '.join(chosen)} both choose the model; give one")
    for key in MODEL_KEYS:
        if key in settings and not isinstance(settings[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {settings[key]!r}")
    if "resume" in settings and not isinstance(settings["resume"], bool):
        raise ValueError(f"{where}: resume must be true or false, got {settings['resume']!r}")
    if "model" in settings:
        if not isinstance(settings["model"], dict):
            raise ValueError(f"{where}: model must be a table ([model]) of model config fields")
        model_fields = {field.name for field in dataclasses.fields(BlockRecurrentConfig)}
        wrong = sorted(set(settings["model"]) - model_fields)
        if wrong:
            raise ValueError(f"{where}: unknown model config fields {', '.join(wrong)}")
    for name, field in train_fields.items():
        if name in settings and isinstance(field.default, float) and type(settings[name]) is int:
            settings[name] = float(settings[name])  # `lr = 1` means 1.0, as on the command line
    return settings


def apply_run_file(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Fill ``brt train``'s parsed options from a run file's ``settings`` where the command line gave none.

    Training options left out on the command line are absent from ``args`` (argparse.SUPPRESS); the model
    choice is the file's only when the command line chose none.
    """
    for field in dataclasses.fields(TrainConfig):
        if field.name in settings and not hasattr(args, field.name):
            setattr(args, field.name, settings[field.name])
    args.resume = args.resume or settings.get("resume", False)
    if all(getattr(args, key) is None for key in MODEL_KEYS):
        for key in MODEL_KEYS:
            setattr(args, key, settings.get(key))
        args.model_fields = settings.get("model")


def model_from_fields(base: BlockRecurrentConfig | None, fields: dict[str, Any], where: str) -> BlockRecurrentConfig:
    """``base`` with ``fields`` changed, or with no base the config ``fields`` spell out whole."""
    try:
        if base is None:
            return BlockRecurrentConfig.from_dict(dict(fields))
        return BlockRecurrentConfig.from_dict({**base.to_dict(), **fields})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} [model]: {error}") from None


# writing


def run_file_text(model_config: BlockRecurrentConfig, config: TrainConfig) -> str:
    """The run file that repeats a run: every training setting (None, TOML has no null: left out, the default)
    and the whole model config. Paths to data and a tokenizer are resolved, so the file works from any folder."""
    settings = config.to_dict()
    for name in TrainConfig.PATHS:
        if settings[name] is not None:
            settings[name] = os.path.realpath(settings[name])
    lines = ["# brt train --config run.toml repeats this run (options given beside it win; docs/training.md)"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in settings.items() if value is not None]
    lines += ["", "[model]"]
    model = model_config.to_dict()
    defaults = {field.name: field.default for field in dataclasses.fields(BlockRecurrentConfig)}
    for name, value in model.items():
        if value is None and defaults[name] is not None:
            raise ValueError(f"model config field {name} is None, which a run file cannot hold")
        if value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_run_file(out_dir: str | Path, model_config: BlockRecurrentConfig, config: TrainConfig) -> Path:
    """Write (atomically, replacing an older one) ``out_dir/run.toml``."""
    path = Path(out_dir) / RUN_FILE
    replace_file(path, run_file_text(model_config, config))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a run file holds finite numbers only, got {value}")
        return repr(value)  # "0.003", "1e-05": both TOML floats; repr round-trips exactly
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"a run file cannot hold {type(value).__name__} values ({value!r})")


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, everything else as it is."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
