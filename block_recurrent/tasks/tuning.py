"""Fine-tune a model on a task at short distances (then score it far beyond them with :func:`.scoring.score`).

Each step draws one distance for the whole batch (uniform in [min_distance, the current largest]; with a
curriculum the largest grows linearly from ``min_distance`` to ``max_distance`` over ``curriculum_steps``, steps
that count only while the recent loss is at most ``curriculum_loss`` when that is set),
builds fresh examples, and runs them through :meth:`SegmentRunner.forward_backward` with the loss on the answers
(or, with ``loss="all"``, on every next token). AdamW with the trainer's parameter groups (the state cells at
``state_lr_scale`` times the learning rate, on top of the model's ``state_cell_scale``), linear warm-up and cosine decay.

A run can be stopped and resumed exactly: :class:`TuneProgress` with the model's weights and the optimiser's state is
all it needs (``brt tune --save-every`` writes them, ``brt tune --resume`` goes on from the newest).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..model.checks import check_choice, check_float, check_int
from ..model.model import BlockRecurrentModel
from ..training.segments import SegmentRunner, passes_one_block
from ..training.train_config import check_seed, lr_at
from .text import TextTask, collate


CURRICULUM_WINDOW = 20  # steps whose mean loss paces the curriculum (curriculum_loss)


@dataclass(frozen=True)
class TuneConfig:
    """Settings of a fine-tuning run on a task (the names mean what they mean in ``TrainConfig``)."""

    max_steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    state_lr_scale: float = 1.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # distances (haystack tokens) drawn per step, uniformly in [min_distance, largest]
    min_distance: int = 0
    max_distance: int = 256
    # the largest distance grows linearly from min_distance to max_distance over this many steps (0: no curriculum)
    curriculum_steps: int = 0
    # > 0: a step moves the curriculum on only while the mean loss of the last CURRICULUM_WINDOW steps is at most
    # this (nats per token), so that a model still learning the task at short distances is not pushed out of them
    curriculum_loss: float = 0.0
    # "answer": the loss on the answers' tokens only; "all": the language-model loss on the whole text
    loss: str = "answer"
    # back-propagate through this many segments (max_seq_len tokens) at a time; 0: the whole example at once
    backward_every: int = 0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "min_distance", "curriculum_steps", "backward_every"):
            check_int(name, getattr(self, name), 0)
        check_seed("seed", self.seed)  # the range every other command takes
        check_int("max_distance", self.max_distance, self.min_distance)
        check_float("lr", self.lr, 0.0, open_low=True)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("state_lr_scale", self.state_lr_scale, 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("beta1", self.beta1, 0.0, 1.0, open_high=True)
        check_float("beta2", self.beta2, 0.0, 1.0, open_high=True)
        check_float("grad_clip", self.grad_clip, 0.0)
        check_choice("loss", self.loss, ("answer", "all"))
        check_float("curriculum_loss", self.curriculum_loss, 0.0)
        if self.curriculum_loss > 0 and self.curriculum_steps == 0:
            raise ValueError(f"curriculum_loss={self.curriculum_loss} paces a curriculum; set curriculum_steps > 0")

    def largest_distance(self, step: int) -> int:
        """The largest distance after ``step`` steps of the curriculum."""
        if self.curriculum_steps == 0 or step >= self.curriculum_steps:
            return self.max_distance
        return self.min_distance + (self.max_distance - self.min_distance) * step // self.curriculum_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TuneProgress:
    """A tuning run between two steps: with the model's weights and the optimiser's state, all it needs to go on as
    if it had never stopped (the examples' generator, the curriculum, the losses not yet logged, the records)."""

    step: int = 0
    rng: dict[str, Any] | None = None  # numpy's bit generator state; None: fresh from the config's seed
    paced: int = 0  # curriculum steps taken (curriculum_loss)
    recent: list[float] = field(default_factory=list)  # the last CURRICULUM_WINDOW losses
    window: list[tuple[float, int]] = field(default_factory=list)  # (loss, distance) since the last record
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training time before this run, so that the records' seconds go on counting

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Any) -> "TuneProgress":
        """Read what :meth:`to_dict` wrote (ValueError naming what is wrong)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(saved, dict) or set(saved) != names:
            raise ValueError(f"a tuning progress record holds {sorted(names)}, got {saved!r:.200}")
        try:
            progress = cls(step=int(saved["step"]), rng=saved["rng"], paced=int(saved["paced"]),
                           recent=[float(x) for x in saved["recent"]],
                           window=[(float(loss), int(d)) for loss, d in saved["window"]],
                           records=[dict(r) for r in saved["records"]], seconds=float(saved["seconds"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"a tuning progress record is malformed ({error})") from None
        if progress.step < 0 or progress.paced < 0 or not isinstance(progress.rng, (dict, type(None))):
            raise ValueError(f"a tuning progress record is malformed (step {progress.step}, paced {progress.paced})")
        return progress


def tune(
    model: BlockRecurrentModel, task: TextTask, config: TuneConfig = TuneConfig(), *,
    log: Callable[[dict[str, Any]], None] | None = None,
    save: Callable[[TuneProgress, torch.optim.Optimizer], None] | None = None, save_every: int = 0,
    resume: TuneProgress | None = None, optimizer_state: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place on ``task``; returns the logged records (step, mean loss and distance since the
    last record, the largest distance of the last step, lr, seconds). ``log`` is called with each record.

    ``save(progress, optimizer)`` is called after every ``save_every`` steps but the last (the caller keeps the
    tuned model itself). ``resume`` (a saved progress), with the model's weights and ``optimizer_state`` (what
    :func:`~block_recurrent.persistence.optimizer_state.optimizer_to_tensors` wrote, as the trainer's checkpoints
    read it back) saved at the same step, goes on from there: the same steps, examples and weights as a run that
    never stopped."""
    from ..training.trainer import parameter_groups  # the optimiser's groups, as the trainer makes them

    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")
    if not isinstance(task, TextTask):
        raise TypeError(f"task must be a TextTask, got {type(task).__name__}")
    if not isinstance(config, TuneConfig):
        raise TypeError(f"config must be a TuneConfig, got {type(config).__name__}")
    if getattr(task.tokenizer, "vocab_size", 0) > model.config.num_tokens:
        raise ValueError(f"the task's tokenizer has {task.tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.num_tokens}")
    check_int("save_every", save_every, 0)
    if save_every and save is None:
        raise ValueError(f"save_every={save_every} needs a save function")
    if (resume is None) != (optimizer_state is None):
        raise ValueError("resume and optimizer_state go together: a progress record and the optimiser saved with it")
    if resume is not None and resume.rng is None:
        raise ValueError("resume: the progress has no generator state (rng) to go on from")
    if resume is not None and not 0 < resume.step < config.max_steps:
        raise ValueError(f"resume: the progress is at step {resume.step}; a run of max_steps={config.max_steps} "
                         f"goes on from steps 1 to {config.max_steps - 1}")
    mc = model.config
    runner = SegmentRunner(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay, config.state_lr_scale), lr=config.lr,
                                  betas=(config.beta1, config.beta2))
    progress = resume or TuneProgress()
    rng = np.random.default_rng(config.seed)  # the examples; the weights' randomness is the caller's
    if resume is not None:
        from ..persistence.optimizer_state import optimizer_from_tensors

        optimizer_from_tensors(optimizer, optimizer_state)
        rng.bit_generator.state = resume.rng
    model.train()
    records, window, began = list(progress.records), list(progress.window), time.perf_counter() - progress.seconds
    paced = progress.paced  # curriculum steps taken
    recent = deque(progress.recent, maxlen=CURRICULUM_WINDOW)  # the last steps' losses
    for step in range(progress.step, config.max_steps):
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # one distance per step: the rows then have the same length (for bytes), with no padding to run
        largest = config.largest_distance(paced if config.curriculum_loss > 0 else step)
        distance = int(rng.integers(config.min_distance, largest + 1))
        # needles kept clear of segment boundaries: a segment's backward pass never sees half a needle
        examples = task.examples(config.batch_size, distance, rng, segment_len=mc.max_seq_len)
        batch = collate(examples, multiple=mc.max_seq_len, ignore_index=mc.ignore_index, lm_loss=config.loss == "all")
        segments = batch.inputs.shape[1] // mc.max_seq_len
        # by default the whole example is one backward pass, so the answer's loss reaches every write back to the
        # needle; with one-block passes the write is replayed instead (as the trainer does), or it would not train
        every = min(config.backward_every or segments, segments)
        optimizer.zero_grad(set_to_none=True)
        result = runner.forward_backward(batch.inputs.to(model.device), labels=batch.labels.to(model.device),
                                         backward_every=every, replay_write=passes_one_block(mc, every))
        loss = float(result.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {step + 1}; try a lower lr")
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        window.append((loss, distance))
        if config.curriculum_loss > 0:
            recent.append(loss)
            if len(recent) == recent.maxlen and sum(recent) / len(recent) <= config.curriculum_loss:
                paced += 1
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            record = {"step": step + 1, "loss": sum(l for l, _ in window) / len(window),
                      "distance": sum(d for _, d in window) / len(window), "largest": largest, "lr": lr,
                      "seconds": round(time.perf_counter() - began, 2)}
            records.append(record)
            window = []
            if log is not None:
                log(record)
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < config.max_steps:
            save(TuneProgress(step + 1, rng.bit_generator.state, paced, list(recent), list(window),
                              [dict(r) for r in records], time.perf_counter() - began), optimizer)
    model.eval()
    return records
