"""Training on long documents: one step per segment window, memories and states carried between steps.

:class:`TrainConfig` holds every training setting (the architecture stays in ``BlockRecurrentConfig``);
:class:`Trainer` owns the model, the optimiser, the data streams and what is carried between steps, and
:func:`train` runs it. A step, in order:

1. set the learning rate (linear warm-up, then cosine decay to ``min_lr_ratio * lr``);
2. read the next window of every batch row (rows continue their documents; ``reset`` marks new ones);
3. per micro-batch, truncated back-propagation over the window's segments (``forward_backward``), each token
   weighted by 1 / (tokens in the whole step, over micro-batches and ranks);
4. all-reduce the gradients across data-parallel ranks, stop on a NaN/inf loss, clip, AdamW step.

Data parallelism: ``torchrun`` sets the environment; rank k reads its own rows of the global set of document
streams, gradients are averaged once per step (as DDP with ``no_sync`` over gradient accumulation; the
segment loop runs several backward passes per step, so the all-reduce is explicit), rank 0 writes
checkpoints holding every rank's data positions and carried states.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import (
    TRAINER_JSON, WEIGHTS_FILE, CheckpointError, check_same_config, latest_checkpoint, load_state,
    load_training_checkpoint, optimizer_from_tensors, read_config, read_json, save_training_checkpoint,
)
from .config import BlockRecurrentConfig
from .distributed import Distributed, resolve_device
from .evaluation import evaluate_corpus
from .data import BATCHERS, TokenCorpus, load_documents, load_tokenizer, path_documents, split_documents
from .model import BlockRecurrentTransformer
from .state import ModelState, XLMemory
from .segments import RecurrentTrainerWrapper

LN2 = math.log(2)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def _check(name: str, value: Any, kind: type, minimum: float | None = None, maximum: float | None = None) -> None:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise ValueError(f"{name} must be {bounds}, got {value}")


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

    # batch: each micro-batch is batch_size rows of segments * max_seq_len tokens
    batch_size: int = 8
    segments: int = 1
    backward_every: int = 1  # back-propagate through this many segments at a time
    grad_accum: int = 1

    # optimisation
    max_steps: int = 300
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    xl_memories_dropout: float = 0.0
    state_dropout: float = 0.0

    # runtime
    seed: int = 0
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when available, else cpu
    bf16: bool = False  # bfloat16 autocast (CUDA only)
    compile: bool = False  # torch.compile the layers (CUDA only)

    # output: metrics, loss curve, samples and checkpoints all go to out_dir
    out_dir: str = "runs/brt"
    log_every: int = 10  # steps between metric lines; loss and bpb are averaged over them
    eval_every: int = 50  # 0: never
    eval_tokens: int = 16384  # validation budget (whole held-out documents, in name order, up to this many tokens)
    sample_tokens: int = 200  # generated after each validation; 0: never
    checkpoint_every: int = 50  # 0: only at the end (and on Ctrl-C)
    keep_last: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "val_data", "hf_dataset", "tokenizer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name} must be a non-empty str or None, got {value!r}")
        if self.data is not None and self.hf_dataset is not None:
            raise ValueError("data and hf_dataset are both set; give one training source")
        if self.mode not in BATCHERS:
            raise ValueError(f"mode must be one of {sorted(BATCHERS)}, got {self.mode!r}")
        for name in ("batch_size", "segments", "backward_every", "grad_accum", "max_steps", "keep_last"):
            _check(name, getattr(self, name), int, 1)
        if self.backward_every > self.segments:
            raise ValueError(f"backward_every ({self.backward_every}) must be <= segments ({self.segments})")
        for name in ("warmup_steps", "log_every", "eval_every", "eval_tokens", "sample_tokens", "checkpoint_every", "seed"):
            _check(name, getattr(self, name), int, 0)
        _check("lr", self.lr, float, 0.0)
        _check("min_lr_ratio", self.min_lr_ratio, float, 0.0, 1.0)
        _check("weight_decay", self.weight_decay, float, 0.0)
        _check("beta1", self.beta1, float, 0.0, 1.0)
        _check("beta2", self.beta2, float, 0.0, 1.0)
        _check("grad_clip", self.grad_clip, float, 0.0)
        _check("xl_memories_dropout", self.xl_memories_dropout, float, 0.0, 1.0)
        _check("state_dropout", self.state_dropout, float, 0.0, 1.0)
        for name in ("bf16", "compile", "progress"):
            _check(name, getattr(self, name), bool)
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"device must be a str such as 'auto', 'cpu' or 'cuda:0', got {self.device!r}")

    # settings a resumed run may change: logging and schedule, and how the same global rows are split into
    # ranks and micro-batches (batch_size * grad_accum * ranks must stay the same; that is checked on restore)
    RESUMABLE = ("max_steps", "out_dir", "log_every", "eval_every", "eval_tokens", "sample_tokens",
                 "checkpoint_every", "keep_last", "progress", "device", "compile", "batch_size", "grad_accum")

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


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# the trainer


class Trainer:
    """Model, optimiser, data streams and carried state of one training run (one rank of it)."""

    def __init__(self, model_config: BlockRecurrentConfig, config: TrainConfig, *, resume: bool = False,
                 distributed: Distributed | None = None):
        if not isinstance(model_config, BlockRecurrentConfig):
            raise TypeError(f"model_config must be a BlockRecurrentConfig, got {type(model_config).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.dist = distributed or Distributed.from_env()
        self.device = resolve_device(config.device, self.dist.local_rank)
        if (config.bf16 or config.compile) and self.device.type != "cuda":
            raise ValueError("bf16 and compile are for CUDA devices; this run is on the CPU (leave them off)")
        self.model_config, self.config = model_config, config
        self.out_dir = Path(config.out_dir)
        self.is_main = self.dist.rank == 0

        # 1. data: tokenizer, documents, the fixed split, the streams of this rank's rows
        self.tokenizer = load_tokenizer(config.tokenizer)
        if self.tokenizer.vocab_size > model_config.num_tokens:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's num_tokens is "
                f"{model_config.num_tokens}; set num_tokens >= {self.tokenizer.vocab_size}"
            )
        documents = load_documents(config.data, hf_dataset=config.hf_dataset, hf_split=config.hf_split,
                                   text_field=config.text_field)
        if config.val_data is None:
            train_docs, val_docs = split_documents(documents)
        else:
            train_docs, val_docs = documents, path_documents(config.val_data)
        self.train_corpus = TokenCorpus.from_documents(train_docs, self.tokenizer)
        self.val_corpus = TokenCorpus.from_documents(val_docs, self.tokenizer)
        rows = config.batch_size * config.grad_accum
        self.batcher = BATCHERS[config.mode](
            self.train_corpus, rows, row_offset=self.dist.rank * rows, total_rows=self.dist.world_size * rows,
            seed=config.seed, ignore_index=model_config.ignore_index,
        )
        self.window = config.segments * model_config.max_seq_len

        # 2. model and optimiser; every rank seeds alike, so every rank starts from the same weights
        torch.manual_seed(config.seed)
        self.model = BlockRecurrentTransformer(model_config).to(self.device)
        self.wrapper = RecurrentTrainerWrapper(self.model, config.xl_memories_dropout, config.state_dropout)
        if config.compile:
            for layer in self.model.layers:
                layer.attn.compile()
                layer.ff.compile()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(config.beta1, config.beta2),
        )

        # 3. progress: steps done, and per micro-batch the state its rows carry into the next step
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.carry: list[ModelState | None] = [None] * config.grad_accum
        if resume:
            found = latest_checkpoint(self.out_dir)
            if found is None:
                raise ValueError(f"resume: {self.out_dir} holds no checkpoint to resume from")
            self.restore(found)
        elif latest_checkpoint(self.out_dir) is not None:
            raise ValueError(f"out_dir {self.out_dir} already holds checkpoints; resume, or choose another out_dir")

    # one step

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimiser step over batch_size * grad_accum rows per rank; returns its metrics."""
        config, ignore = self.config, self.model_config.ignore_index
        lr = lr_at(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.batcher.next_batch(self.window)
        micro = [batch.rows(m * config.batch_size, (m + 1) * config.batch_size) for m in range(config.grad_accum)]

        # every label token of the step, over micro-batches and ranks, weighs 1 / total
        counts = [int((b.labels != ignore).sum()) for b in micro]
        total = int(self.dist.all_reduce(torch.tensor([sum(counts)], dtype=torch.float64)).item())
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m, b in enumerate(micro):
            state = self.carry[m] if config.mode == "stream" else None
            with self._autocast():
                result = self.wrapper.forward_backward(
                    b.inputs.to(self.device), labels=b.labels.to(self.device), state=state,
                    reset=b.reset.to(self.device), backward_every=config.backward_every,
                    loss_scale=self.dist.world_size * counts[m] / max(total, 1),
                )
            self.carry[m] = result.state
            loss_sum += float(result.loss) * result.tokens
        self._all_reduce_gradients()
        loss = float(self.dist.all_reduce(torch.tensor([loss_sum], dtype=torch.float64)).item()) / max(total, 1)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {self.step + 1}; stopped without saving (try a lower lr, or grad_clip)"
            )
        grad_norm = 0.0
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip))
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += total
        return {"loss": loss, "bpb": loss / LN2 / self.train_corpus.bytes_per_token, "lr": lr,
                "grad_norm": grad_norm, "tokens": total}

    def _all_reduce_gradients(self) -> None:
        if not self.dist.active:
            return
        params = list(self.model.parameters())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = self.dist.all_reduce(torch.cat([g.reshape(-1) for g in grads]))  # one all-reduce per step
        flat /= self.dist.world_size
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()

    # validation and samples

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Streaming loss over the held-out documents (each from a fresh state), split across ranks."""
        with self._autocast():
            result = evaluate_corpus(self.model, self.val_corpus, max_tokens=self.config.eval_tokens,
                                     distributed=self.dist)
        return {f"val_{k}": v for k, v in result.items() if k != "documents"}

    def sample(self, prompt_tokens: int = 64) -> tuple[str, str]:
        """(prompt, continuation): the start of the first held-out document, continued by the model."""
        from .generation import generate

        prompt = torch.from_numpy(self.val_corpus.document(0)[:prompt_tokens].astype("int64"))
        generator = torch.Generator(self.device).manual_seed(self.config.seed + self.step)  # not the global RNG
        with self._autocast():
            new = generate(self.model, prompt[None].to(self.device), self.config.sample_tokens,
                           temperature=0.8, top_k=50, generator=generator)
        return self.tokenizer.decode(prompt.tolist()), self.tokenizer.decode(new[0].tolist())

    # checkpoints

    def _gathered_carry(self) -> dict[str, Tensor]:
        """Every rank's carried states, rows in global order (all ranks take part; rank 0 keeps the result).

        Global row g = rank * (batch_size * grad_accum) + micro * batch_size + row, as the data streams number
        them, so a checkpoint can be resumed with another split of the same rows into ranks and micro-batches.
        """
        if self.config.mode != "stream" or any(state is None for state in self.carry):
            return {}
        per_micro = [state.to_tensors("carry") for state in self.carry]
        tensors = {key: torch.cat([t[key] for t in per_micro]) for key in per_micro[0]}  # (rows of this rank, ...)
        # every rank holds the same keys and shapes; gathered: (all rows, ...)
        return {key: self.dist.all_gather(tensor) for key, tensor in sorted(tensors.items())}

    def _gathered_positions(self) -> dict[str, Any]:
        state = self.batcher.state_dict()
        if not self.dist.active or state["mode"] != "stream":
            return state
        positions = self.dist.all_gather(torch.tensor(state["positions"], dtype=torch.int64))
        return {**state, "row_offset": 0, "positions": positions.tolist()}

    def save(self) -> Path | None:
        """Write a checkpoint of the state after ``self.step`` steps (rank 0 writes; all ranks must call)."""
        carry = self._gathered_carry()
        data = self._gathered_positions()
        if not self.is_main:
            return None
        tensors = {k: v.cpu() for k, v in carry.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        trainer = {
            "format": 1, "train_config": self.config.to_dict(), "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed, "world_size": self.dist.world_size, "data": data,
            "tokenizer": self.tokenizer.describe(),
        }
        return save_training_checkpoint(
            self.out_dir, self.step, model=self.model, optimizer=self.optimizer, trainer=trainer, tensors=tensors,
            keep_last=self.config.keep_last, tokenizer_file=self.config.tokenizer,
        )

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimiser, step, data positions, carried states, RNG."""
        saved = load_training_checkpoint(path)
        check_same_config(saved.config, self.model_config, saved.path)
        settings = saved.trainer.get("train_config", {})
        mine = self.config.to_dict()
        differs = [k for k in sorted(mine) if k not in TrainConfig.RESUMABLE and settings.get(k) != mine[k]]
        if differs:
            details = "; ".join(f"{k}: checkpoint {settings.get(k)!r}, now {mine[k]!r}" for k in differs)
            raise CheckpointError(f"cannot resume {saved.path} with other training settings ({details})")
        load_state(self.model, saved.weights, saved.path / WEIGHTS_FILE)
        optimizer_from_tensors(self.optimizer, saved.optimizer)
        self.step = saved.trainer["step"]
        self.tokens_seen = saved.trainer.get("tokens_seen", 0)
        self.elapsed = saved.trainer.get("elapsed_s", 0.0)

        # this rank's rows of the global data positions and carried states
        data = dict(saved.trainer["data"])
        rows = self.batcher.rows
        if data["mode"] == "stream":
            positions = data["positions"]
            if len(positions) != self.batcher.total_rows:
                raise CheckpointError(
                    f"the checkpoint streams {len(positions)} rows; this run has {self.batcher.total_rows} "
                    "(batch_size * grad_accum * ranks must match)"
                )
            data["positions"] = positions[self.batcher.row_offset : self.batcher.row_offset + rows]
        self.batcher.load_state_dict(data)
        tensors = saved.tensors
        carried = {k: v for k, v in tensors.items() if k.startswith("carry.")}
        if carried:
            depth, num_states = self.model_config.depth, len(self.model_config.recurrent_layers)
            every_row = ModelState.from_tensors(carried, "carry", depth, num_states)
            if every_row.batch_size != self.batcher.total_rows:
                raise CheckpointError(f"{saved.path}: carried states have {every_row.batch_size} rows, expected "
                                      f"{self.batcher.total_rows}")
            given = [carried.get(f"carry.memory.{i}.valid_given") for i in range(depth)]
            for m in range(self.config.grad_accum):
                start = self.batcher.row_offset + m * self.config.batch_size
                rows_of_micro = torch.arange(start, start + self.config.batch_size)
                state = every_row.select_rows(rows_of_micro)
                # a micro-batch whose memory had no validity mask gets none back (same computation path)
                memories = tuple(
                    XLMemory(memory.keys, memory.values, None)
                    if memory is not None and had is not None and not had[rows_of_micro].any() else memory
                    for memory, had in zip(state.memories, given)
                )
                self.carry[m] = ModelState(memories, state.states).to(self.device)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    # the loop

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps``; validate, sample and checkpoint on schedule. Returns the last metrics."""
        return _Loop(self).run()


class _Loop:
    """Progress bar, metrics log, loss curve, Ctrl-C and the schedule around :meth:`Trainer.train_step`."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.metrics_path = trainer.out_dir / "metrics.jsonl"
        self.stop_requested = False

    def log(self, record: dict[str, Any]) -> None:
        if self.trainer.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """On resume, forget records past the checkpoint (a crashed run may have logged further)."""
        if self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _on_signal(self, signum, frame) -> None:
        # finish the step in flight, save, exit; a second signal interrupts at once
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        return bool(self.trainer.dist.all_reduce(flag).item() > 0)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t, config = self.trainer, self.trainer.config
        if t.is_main:
            t.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_log(t.step)
        # Ctrl-C (and SIGTERM, which torchrun sends its workers on Ctrl-C) stop after the step in flight
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for number, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(number) is default:
                    previous[number] = signal.signal(number, self._on_signal)
        bar = tqdm(total=config.max_steps, initial=t.step, disable=not (t.is_main and config.progress),
                   unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {"step": t.step}
        saved_at = t.step
        start, tokens_since, tick = time.perf_counter(), 0, time.perf_counter()
        interval_loss, interval_tokens = 0.0, 0  # loss and bpb are logged as means over the log interval
        try:
            while t.step < config.max_steps:
                metrics = t.train_step()
                tokens_since += metrics["tokens"]
                interval_loss += metrics["loss"] * metrics["tokens"]
                interval_tokens += metrics["tokens"]
                now = time.perf_counter()
                t.elapsed += now - start
                start = now
                bar.update(1)
                if t.step % config.log_every == 0 or t.step == config.max_steps:
                    rate = tokens_since / max(now - tick, 1e-9)
                    loss = interval_loss / max(interval_tokens, 1)
                    bpb = loss / LN2 / t.train_corpus.bytes_per_token
                    tokens_since, tick, interval_loss, interval_tokens = 0, now, 0.0, 0
                    last = {"step": t.step, **metrics, "loss": loss, "bpb": bpb, "tokens_per_s": rate,
                            "tokens_seen": t.tokens_seen, "elapsed_s": round(t.elapsed, 2)}
                    self.log(last)
                    bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bpb:.3f}", tok_s=f"{rate:.0f}")
                paused = False  # validation and checkpoints do not count towards tokens/s
                if config.eval_every and t.step % config.eval_every == 0:
                    last.update(self.evaluate(bar))
                    paused = True
                if config.checkpoint_every and t.step % config.checkpoint_every == 0:
                    self.checkpoint()
                    saved_at, paused = t.step, True
                if paused:
                    tokens_since, tick = 0, time.perf_counter()
                if self._stop_everywhere():
                    bar.write(f"interrupted: saving step {t.step} and stopping", file=sys.stderr)
                    break
            if saved_at != t.step:
                self.checkpoint()
        finally:
            bar.close()
            for number, handler in previous.items():
                signal.signal(number, handler)
        last["interrupted"] = self.stop_requested
        return last

    def evaluate(self, bar) -> dict[str, Any]:
        t = self.trainer
        result = t.validate()
        record = {"step": t.step, **result}
        message = f"step {t.step}: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte"
        if t.is_main and t.config.sample_tokens:
            prompt, continuation = t.sample()
            record["sample"] = {"prompt": prompt, "continuation": continuation}
            message += f"\n--- sample ---\n{prompt}\033[1m{continuation}\033[0m\n--------------"
        self.log(record)
        if t.is_main and t.config.progress:
            bar.write(message)
        return result

    def checkpoint(self) -> None:
        path = self.trainer.save()
        if path is not None:
            plot_metrics(self.metrics_path, self.trainer.out_dir / "loss_curve.png")


_PLOT_WARNED = False


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Bits per byte (training and validation) against steps; None, with one message, without matplotlib."""
    global _PLOT_WARNED
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _PLOT_WARNED:
            print("loss curve skipped: matplotlib is not installed (pip install 'block-recurrent[plot]')")
            _PLOT_WARNED = True
        return None
    if not metrics_path.exists():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["bpb"]) for r in records if "bpb" in r]
    val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def resume_configs(out_dir: str | Path, **overrides: Any) -> tuple[BlockRecurrentConfig, TrainConfig]:
    """The model and training configs of the run in ``out_dir`` (its latest checkpoint), with ``overrides``.

    Overriding a setting outside ``TrainConfig.RESUMABLE`` is refused when the run is restored.
    """
    found = latest_checkpoint(out_dir)
    if found is None:
        raise ValueError(f"resume: {out_dir} holds no checkpoint to resume from")
    saved = read_json(found / TRAINER_JSON)
    if not isinstance(saved, dict) or not isinstance(saved.get("train_config"), dict):
        raise CheckpointError(f"{found / TRAINER_JSON} is damaged (no train_config)")
    settings = {**saved["train_config"], **overrides, "out_dir": str(out_dir)}
    return read_config(found), TrainConfig.from_dict(settings)


def train(model_config: BlockRecurrentConfig, config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train (or with ``resume``, continue) a model; returns the last logged metrics.

    Under ``torchrun`` every rank calls this; the process group is left when training ends.
    """
    trainer = Trainer(model_config, config, resume=resume)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.active and dist.is_initialized():
            dist.destroy_process_group()
