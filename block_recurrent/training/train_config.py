"""Training settings: :class:`TrainConfig` (everything about a run except the architecture) and the
learning-rate schedule :func:`lr_at`. Every number is checked to be finite and in range when the config is
built, so a NaN or an infinity never reaches the optimiser (or a checkpoint)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..model.checks import check_bool, check_choice, check_float, check_int
from ..model.config import BlockRecurrentConfig
from ..persistence.budget import check_fits, parameter_count
from .data import BATCHERS
from .loggers import check_log
from .packages import DOCUMENT_KINDS


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the architecture. Sizes are per rank."""

    # data (exactly one source: data, hf_dataset, or neither for the built-in standard-library corpus)
    data: str | None = None
    val_data: str | None = None  # held-out documents; by default the fixed split of the training source
    hf_dataset: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    tokenizer: str | None = None  # a `tokenizers` JSON file; bytes (vocabulary 256) when None
    mode: str = "stream"  # "stream": rows continue their documents; "crop": random windows, fresh each step
    # "file": every file is a document; "package": every folder at package_depth is one, its files concatenated,
    # held out by package (training/packages.py)
    documents: str = "file"
    package_depth: int = 1
    # a resumed run refuses data whose documents (names, sizes) or resolved paths changed; True: warn and go on
    allow_data_change: bool = False

    # batch: each micro-batch is batch_size rows of segments * max_seq_len tokens
    batch_size: int = 128
    segments: int = 1
    backward_every: int = 1  # back-propagate through this many segments at a time
    grad_accum: int = 1

    # optimisation
    # as many steps as keep `brt train` within five minutes on two CPU cores: steps still pay at this budget, and
    # more would leave no margin for a slower machine (docs/experiments/default-recipe.md)
    max_steps: int = 1800
    lr: float = 3e-3
    # the recurrent state cells' parameters (initial state, IDs, the write's attention, update and gate) learn at
    # this multiple of lr, on top of the model's own state_cell_scale (which already slows them 10x by default:
    # docs/experiments/slow-state-cells.md)
    state_lr_scale: float = 1.0
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    xl_memories_dropout: float = 0.0
    state_dropout: float = 0.0
    # with one block per backward pass, redo each block's state write at the start of the next pass with the graph
    # attached, so that the write learns (see SegmentRunner.forward_backward); None (auto): on exactly then
    replay_write: bool | None = None

    # runtime
    seed: int = 0
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when available, else cpu
    # bfloat16 autocast; None (auto): on where bf16 is native (CUDA, AVX-512 BF16 / AMX CPUs). State, gates and
    # loss stay float32
    bf16: bool | None = None
    compile: bool = False  # torch.compile the layers (CUDA only)

    # output: metrics, loss curve, samples and checkpoints all go to out_dir
    out_dir: str = "runs/brt"
    log_every: int = 10  # steps between metric lines; loss and bpb are averaged over them
    eval_every: int = 600  # 0: never
    eval_tokens: int = 16384  # validation budget: the first eval_tokens / files tokens of every held-out file
    final_eval: bool = True  # at the end, score the whole held-out split and compare it with gzip -9 per file
    sample_tokens: int = 200  # generated after each validation; 0: never
    checkpoint_every: int = 600  # 0: only at the end (and on Ctrl-C)
    keep_last: int = 3
    progress: bool = True
    # experiment trackers beside metrics.jsonl: "none", "tensorboard", "wandb" or both joined by a comma
    log: str = "none"

    def __post_init__(self) -> None:
        for name in ("data", "val_data", "hf_dataset", "tokenizer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name} must be a non-empty str or None, got {value!r}")
        for name in ("hf_split", "text_field", "device", "out_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:  # "" as out_dir would train into the current folder
                raise TypeError(f"{name} must be a non-empty str, got {value!r}")
        if self.data is not None and self.hf_dataset is not None:
            raise ValueError("data and hf_dataset are both set; give one training source")
        check_choice("mode", self.mode, BATCHERS)
        check_choice("documents", self.documents, DOCUMENT_KINDS)
        check_int("package_depth", self.package_depth, 1)
        if self.documents == "package" and self.hf_dataset is not None:
            raise ValueError("documents='package' groups the files of folders; hf_dataset rows have none")
        for name in ("batch_size", "segments", "backward_every", "grad_accum", "max_steps", "keep_last", "log_every"):
            check_int(name, getattr(self, name), 1)
        if self.backward_every > self.segments:
            raise ValueError(f"backward_every ({self.backward_every}) must be <= segments ({self.segments})")
        for name in ("warmup_steps", "eval_every", "sample_tokens", "checkpoint_every"):
            check_int(name, getattr(self, name), 0)
        check_seed("seed", self.seed)
        # a validation scores next-token predictions: it needs two tokens at least, or nothing is scored
        check_int("eval_tokens", self.eval_tokens, 2)
        check_float("lr", self.lr, 0.0)
        check_float("state_lr_scale", self.state_lr_scale, 0.0)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("beta1", self.beta1, 0.0, 1.0)
        check_float("beta2", self.beta2, 0.0, 1.0)
        check_float("grad_clip", self.grad_clip, 0.0)
        check_float("xl_memories_dropout", self.xl_memories_dropout, 0.0, 1.0)
        check_float("state_dropout", self.state_dropout, 0.0, 1.0)
        for name in ("bf16", "replay_write"):
            if getattr(self, name) is not None:
                check_bool(name, getattr(self, name))
        for name in ("compile", "progress", "allow_data_change", "final_eval"):
            check_bool(name, getattr(self, name))
        check_log("log", self.log)

    # settings a resumed run may change: logging and schedule, and how the same global rows are split into
    # ranks and micro-batches (batch_size * grad_accum * ranks must stay the same; that is checked on restore)
    RESUMABLE = ("max_steps", "out_dir", "log_every", "eval_every", "eval_tokens", "final_eval", "sample_tokens",
                 "checkpoint_every", "keep_last", "progress", "device", "compile", "batch_size", "grad_accum",
                 "allow_data_change", "log")
    # paths, compared by the folder or file they name (resolved), not by how they are written
    PATHS = ("data", "val_data", "tokenizer")
    # what a run saved before a setting existed did, for the settings whose default has changed since
    LEGACY = {"replay_write": False, "state_lr_scale": 1.0}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# named recipes: a model preset and the training settings measured with it (docs/experiments/default-recipe.md,
# hour-recipe.md); ``brt train
# --recipe NAME`` starts from them, and options given beside it still win
RECIPES: dict[str, dict[str, Any]] = {
    # what `brt train` runs with no options: five minutes on two CPU cores
    "default": dict(preset="mini", train={}),
    # about an hour on two CPU cores (bf16 autocast); pinned as it was measured, without the write's replay and
    # the slow state cells (with them its 20-minute version scored worse, docs/experiments/hour-recipe.md)
    "hour": dict(preset="hour", train=dict(batch_size=128, max_steps=9000, eval_every=3000, checkpoint_every=3000,
                                           out_dir="runs/brt-hour", replay_write=False, state_lr_scale=1.0)),
}


def recipe(name: str) -> tuple[str, dict[str, Any]]:
    """A named recipe's model preset and training settings (TrainConfig fields)."""
    check_choice("recipe", name, RECIPES)
    chosen = RECIPES[name]
    return chosen["preset"], dict(chosen["train"])


# every command checks its seed the same way: torch and numpy take any int in this range
MAX_SEED = 2**63 - 1


def check_seed(name: str, value: object) -> None:
    """A seed every random generator here accepts: an int in [0, 2**63 - 1]."""
    check_int(name, value, 0, MAX_SEED)


def finite_number(text: str) -> float:
    """An option's value that must be a finite number (``type=`` of argparse): a one-line error otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def check_step_fits(model_config: BlockRecurrentConfig, config: TrainConfig, device: torch.device) -> None:
    """Refuse, before anything is allocated, settings whose one training step cannot fit in ``device``'s memory,
    naming the settings of the largest part: the step's token buffers (inputs and labels, int64), the parameters
    with their gradients and AdamW moments (float32), and the activations one backward pass keeps (a lower
    bound: each layer's input, attention output and feed-forward, and the logits)."""
    c = model_config
    tokens = config.batch_size * config.grad_accum * config.segments * c.max_seq_len
    in_pass = config.batch_size * config.backward_every * c.max_seq_len
    parts = {
        "token buffers": tokens * 16,
        "parameters, gradients and AdamW moments": parameter_count(c) * 16,
        "activations of one backward pass": in_pass * (c.depth * (2 * c.dim + c.ff_inner_dim) + 2 * c.num_tokens) * 4,
    }
    model = f"the model (num_tokens {c.num_tokens}, dim {c.dim}, depth {c.depth})"
    settings = {
        "token buffers": f"batch_size {config.batch_size} x grad_accum {config.grad_accum} x segments "
                         f"{config.segments} x max_seq_len {c.max_seq_len} tokens per step",
        "parameters, gradients and AdamW moments": model,
        "activations of one backward pass": f"batch_size {config.batch_size} x backward_every {config.backward_every} x "
                                            f"max_seq_len {c.max_seq_len} tokens per backward pass through {model}",
    }
    check_fits(parts, device, settings[max(parts, key=parts.get)])


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
