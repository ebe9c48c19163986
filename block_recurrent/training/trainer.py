"""Training on long documents: one step per segment window, memories and states carried between steps.

:class:`~block_recurrent.training.train_config.TrainConfig` holds every training setting (the architecture stays in
``BlockRecurrentConfig``); :class:`Trainer` owns the model, the optimiser, the data streams and what is carried
between steps, saves and restores them; :func:`train` runs it through :class:`~block_recurrent.training.run_loop.RunLoop`.
A step, in order:

1. set the learning rate (linear warm-up, then cosine decay to ``min_lr_ratio * lr``);
2. read the next window of every batch row (rows continue their documents; ``reset`` marks new ones);
3. per micro-batch, truncated back-propagation over the window's segments (``forward_backward``), each token
   weighted by 1 / (tokens in the whole step, over micro-batches and ranks);
4. all-reduce the gradients across data-parallel ranks, stop on a NaN/inf loss, clip, AdamW step.

Data parallelism: ``torchrun`` sets the environment; rank k reads its own rows of the global set of document
streams, gradients are averaged once per step (as DDP with ``no_sync`` over gradient accumulation; the
segment loop runs several backward passes per step, so the all-reduce is explicit), rank 0 writes
checkpoints holding every rank's data positions and carried states.

The run folder belongs to one process at a time: rank 0 locks it for the trainer's life and clears what a killed
run left half-written; what a checkpoint holds beyond the model, and whether it belongs to this run, is
:mod:`.checkpointing`'s (:func:`resume` locks the folder before it reads the checkpoint it continues from).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.torch_version import TorchVersion

from ..inference.evaluation import bits_per_byte
from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel
from ..model.state import ModelState, carry_from_tensors, carry_to_tensors
from ..persistence.checkpoint import (
    WEIGHTS_FILE, CheckpointError, TrainingCheckpoint, latest_checkpoint, load_state, load_training_checkpoint,
    newest_intact_checkpoint, optimizer_from_tensors, save_training_checkpoint,
)
from .checkpointing import (
    RunFolder, check_record, check_same_run, fingerprint, open_resumed, rank_data_state, resolved_path,
    resume_configs,
)
from .data import (
    BATCHERS, TokenCorpus, gzip_bits_per_byte, load_tokenizer,
)
from .distributed import Distributed, resolve_device
from .packages import source_documents, split_source
from .precision import resolve_bf16, resolve_eval_bf16
from .run_loop import RunLoop
from .segments import SegmentRunner, check_replay_write, passes_one_block
from .train_config import TrainConfig, check_step_fits, lr_at
from .validation import evaluate_corpus

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "lr_at", "parameter_groups", "resume", "resume_configs",
           "train"]



def fused_adamw_supported(device: torch.device) -> bool:
    """Whether AdamW's fused kernel runs on ``device``: one kernel for every parameter instead of a dozen ops per
    parameter group, which matters most for small models, whose step is mostly that overhead. CUDA has it, the
    CPU from torch 2.4."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and TorchVersion(torch.__version__) >= "2.4"


def parameter_groups(model: BlockRecurrentModel, weight_decay: float, state_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices only; the recurrent state cells' parameters with
    ``lr_scale`` = ``state_lr_scale`` (the trainer sets each group's lr to lr * lr_scale), the rest at 1. With a
    scale of 1 there are two groups, as before the setting existed, so older checkpoints' optimisers still fit.

    A model that stores its cells scaled (``config.state_cell_scale``) has them stepped at that fraction of the
    learning rate; their weight decay (lr * decay per step, on the stored value) is scaled alike, so that a slow
    cell is slow in both, as it was under a group learning rate."""
    in_cells = {id(p) for cell in model.cells for p in cell.parameters()}
    cell_decay = weight_decay * model.config.state_cell_scale
    groups: dict[tuple[float, float], list] = {}
    for p in model.parameters():
        in_cell = id(p) in in_cells
        decay = 0.0 if p.ndim < 2 else cell_decay if in_cell else weight_decay
        groups.setdefault((decay, state_lr_scale if in_cell else 1.0), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr_scale": scale} for (decay, scale), params in groups.items()]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is left as it was."""


class Trainer:
    """Model, optimiser, data streams and carried state of one training run (one rank of it)."""

    def __init__(self, model_config: BlockRecurrentConfig, config: TrainConfig, *,
                 resume: bool | TrainingCheckpoint = False, distributed: Distributed | None = None,
                 run: RunFolder | None = None):
        """``resume``: True continues from the run folder's newest complete checkpoint; a loaded
        :class:`TrainingCheckpoint` (see :func:`resume`) continues from that one. ``run``: the run folder,
        already opened (and locked) by the caller; by default the trainer opens it."""
        if not isinstance(model_config, BlockRecurrentConfig):
            raise TypeError(f"model_config must be a BlockRecurrentConfig, got {type(model_config).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.dist = distributed or Distributed.from_env()
        self.device = resolve_device(config.device, self.dist.local_rank)
        check_step_fits(model_config, config, self.device)  # before anything is allocated
        self.bf16 = resolve_bf16(config.bf16, self.device)  # None: on where bf16 is native
        # validation follows an explicit setting; auto also weighs the block width (scoring has no backward pass)
        self.eval_bf16 = resolve_eval_bf16(config.bf16, self.device, model_config.block_width,
                                           model_config.blocks_side_by_side)
        if config.compile and self.device.type != "cuda":
            raise ValueError("compile is for CUDA devices; this run is on the CPU (leave it off)")
        self.model_config, self.train_config = model_config, config
        self.out_dir = Path(config.out_dir)
        self.is_main = self.dist.rank == 0

        # 0. the run folder: created and locked by rank 0 (held until close()), a killed run's leftovers cleared
        self.run = run or RunFolder.open(self.out_dir, main=self.is_main, resume=resume is True)

        # 1. data: tokenizer, documents, the fixed split, the streams of this rank's rows
        self.tokenizer = load_tokenizer(config.tokenizer)
        if self.tokenizer.vocab_size > model_config.num_tokens:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's num_tokens is "
                f"{model_config.num_tokens}; set num_tokens >= {self.tokenizer.vocab_size}"
            )
        documents = source_documents(config.data, hf_dataset=config.hf_dataset, hf_split=config.hf_split,
                                     text_field=config.text_field, documents=config.documents,
                                     package_depth=config.package_depth)
        if config.val_data is None:
            train_docs, val_docs = split_source(documents, config.documents)
        else:
            train_docs, val_docs = documents, source_documents(config.val_data, documents=config.documents,
                                                               package_depth=config.package_depth)
        self.data_source = {
            "paths": {name: resolved_path(getattr(config, name)) for name in TrainConfig.PATHS},
            "train": fingerprint(train_docs), "validation": fingerprint(val_docs),
        }
        self.train_corpus = TokenCorpus.from_documents(train_docs, self.tokenizer)
        self.val_corpus = TokenCorpus.from_documents(val_docs, self.tokenizer)
        self.val_documents = val_docs  # their text, for gzip's figure at the end of a run
        longest = max(len(self.val_corpus.document(i)) for i in range(len(self.val_corpus)))
        if config.eval_every and longest < 2:  # a validation would score no token at all
            raise ValueError(
                "validation: no held-out document has 2 tokens or more, so nothing could be scored; "
                "give more data, val_data, or eval_every=0"
            )
        rows = config.batch_size * config.grad_accum
        self.batcher = BATCHERS[config.mode](
            self.train_corpus, rows, row_offset=self.dist.rank * rows, total_rows=self.dist.world_size * rows,
            seed=config.seed, ignore_index=model_config.ignore_index,
        )
        self.step_length = config.segments * model_config.max_seq_len  # tokens per row per step

        # one block per backward pass: the state written at a block's end is read only after the carry is detached,
        # so the write trains only if it is replayed in the next pass (SegmentRunner.forward_backward)
        one_block = passes_one_block(model_config, config.backward_every)
        self.replay_write = bool(model_config.recurrent_layers) and (
            one_block if config.replay_write is None else config.replay_write)
        if self.replay_write:
            check_replay_write(model_config, config.backward_every)
        if model_config.recurrent_layers and one_block and not self.replay_write:
            warnings.warn(
                f"every backward pass covers one block (max_seq_len = block_width = {model_config.block_width}, "
                "backward_every = 1) and replay_write is off, so the recurrent state's write path (its attention, "
                "update projection and gate) gets no gradient and keeps its initial weights; turn replay_write on, "
                "or give each backward pass two blocks or more", stacklevel=2)

        # 2. model and optimiser; every rank seeds alike, so every rank starts from the same weights
        torch.manual_seed(config.seed)
        self.model = BlockRecurrentModel(model_config).to(self.device)
        self.wrapper = SegmentRunner(self.model, config.xl_memories_dropout, config.state_dropout)
        if config.compile:
            for layer in self.model.layers:
                layer.attn.compile()
                layer.ff.compile()
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.weight_decay, config.state_lr_scale),
            lr=config.lr, betas=(config.beta1, config.beta2), fused=fused_adamw_supported(self.device),
        )

        # 3. progress: steps done, and per micro-batch the state its rows carry into the next step
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.carry: list[ModelState | None] = [None] * config.grad_accum
        # with replay_write, per micro-batch: the states the last block's write started from (SegmentResult)
        self.written_from: list[tuple[Tensor | None, ...] | None] = [None] * config.grad_accum
        if resume is not False:
            self.restore(newest_intact_checkpoint(self.out_dir, check_record) if resume is True else resume)
        elif latest_checkpoint(self.out_dir) is not None:
            raise ValueError(f"out_dir {self.out_dir} already holds checkpoints; resume, or choose another out_dir")

    # one step

    def _autocast(self, enabled: bool | None = None):
        if self.bf16 if enabled is None else enabled:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimiser step over batch_size * grad_accum rows per rank; returns its metrics."""
        config, ignore = self.train_config, self.model_config.ignore_index
        lr = lr_at(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = self.batcher.next_batch(self.step_length)
        micro = [batch.rows(m * config.batch_size, (m + 1) * config.batch_size) for m in range(config.grad_accum)]

        # every label token of the step, over micro-batches and ranks, weighs 1 / total
        counts = [int((b.labels != ignore).sum()) for b in micro]
        total = int(self.dist.all_reduce(torch.tensor([sum(counts)], dtype=torch.float64)).item())
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        carries_documents = config.mode == "stream"  # rows continue their documents from the last step
        for m, b in enumerate(micro):
            with self._autocast():
                result = self.wrapper.forward_backward(
                    b.inputs.to(self.device), labels=b.labels.to(self.device), state=self.carry[m] if carries_documents else None,
                    reset=b.reset.to(self.device), backward_every=config.backward_every,
                    loss_scale=self.dist.world_size * counts[m] / max(total, 1),
                    replay_write=self.replay_write, written_from=self.written_from[m] if carries_documents else None,
                )
            self.carry[m], self.written_from[m] = result.state, result.written_from
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
        return {"loss": loss, "bpb": bits_per_byte(loss, self.train_corpus.bytes_per_token), "lr": lr,
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
    def validate(self, whole: bool = False) -> dict[str, float]:
        """Streaming loss over the held-out documents (each from a fresh state), split across ranks: the same
        sample of every file each time (``eval_tokens`` shared by the files), or with ``whole`` every token."""
        with self._autocast(self.eval_bf16):
            result = evaluate_corpus(self.model, self.val_corpus, max_tokens=None if whole else self.train_config.eval_tokens,
                                     distributed=self.dist, spread=True)
        prefix = "held_out_" if whole else "val_"
        return {f"{prefix}{k}": v for k, v in result.items() if k != "documents"}

    def held_out_gzip_bpb(self) -> float:
        """gzip -9's bits per byte on the held-out documents, each compressed alone, as the model reads them."""
        return gzip_bits_per_byte(self.val_documents)

    def sample_text(self, prompt_tokens: int = 64) -> tuple[str, str]:
        """(prompt, continuation): the start of the first held-out document, continued by the model."""
        from ..inference.generation import generate

        prompt = torch.from_numpy(self.val_corpus.document(0)[:prompt_tokens].astype("int64"))
        generator = torch.Generator(self.device).manual_seed(self.train_config.seed + self.step)  # not the global RNG
        with self._autocast():
            new = generate(self.model, prompt[None].to(self.device), self.train_config.sample_tokens,
                           temperature=0.8, top_k=50, generator=generator)
        return self.tokenizer.decode(prompt.tolist()), self.tokenizer.decode(new[0].tolist())

    # checkpoints

    def _gathered_carry(self) -> dict[str, Tensor]:
        """Every rank's carried states, rows in global order (all ranks take part; rank 0 keeps the result).

        Global row g = rank * (batch_size * grad_accum) + micro * batch_size + row, as the data streams number
        them, so a checkpoint can be resumed with another split of the same rows into ranks and micro-batches.
        """
        if self.train_config.mode != "stream" or any(state is None for state in self.carry):
            return {}
        initial = self.model.initial_states()
        per_micro = [carry_to_tensors(state, written if self.replay_write else None, initial)
                     for state, written in zip(self.carry, self.written_from)]
        tensors = {key: torch.cat([t[key] for t in per_micro]) for key in per_micro[0]}  # (rows of this rank, ...)
        # every rank holds the same keys and shapes; gathered: (all rows, ...)
        return {key: self.dist.all_gather(tensor) for key, tensor in sorted(tensors.items())}

    def _gathered_positions(self) -> dict[str, Any]:
        state = self.batcher.state_dict()
        if not self.dist.active or state["mode"] != "stream":
            return state
        positions = self.dist.all_gather(torch.tensor(state["positions"], dtype=torch.int64))
        return {**state, "row_offset": 0, "positions": positions.tolist()}

    def save(self, *, elapsed: float | None = None) -> Path | None:
        """Write a checkpoint of the state after ``self.step`` steps (rank 0 writes; all ranks must call), with
        ``elapsed`` seconds of training (by default the time the run had when it was restored).

        Raises TrainingDiverged, writing nothing, when a weight is NaN or infinite (every rank holds the same
        weights, so every rank stops).
        """
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingDiverged(f"weights hold NaN or inf after step {self.step}; not saved, the last "
                                   "checkpoint is left as it was (try a lower lr, or grad_clip)")
        carry = self._gathered_carry()
        data = self._gathered_positions()
        if not self.is_main:
            return None
        tensors = {k: v.cpu() for k, v in carry.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        trainer = {
            "train_config": self.train_config.to_dict(), "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed if elapsed is None else elapsed, "world_size": self.dist.world_size,
            "data": data, "data_source": self.data_source, "tokenizer": self.tokenizer.describe(),
        }
        return save_training_checkpoint(
            self.out_dir, self.step, model=self.model, optimizer=self.optimizer, trainer=trainer, tensors=tensors,
            keep_last=self.train_config.keep_last, tokenizer_file=self.train_config.tokenizer,
        )

    def restore(self, saved: TrainingCheckpoint | str | Path) -> None:
        """Continue from a checkpoint: weights, optimiser, step, data positions, carried states, RNG."""
        if not isinstance(saved, TrainingCheckpoint):
            saved = load_training_checkpoint(saved)
        check_record(saved)
        check_same_run(saved, self.model_config, self.train_config, self.data_source)
        self.run.set_aside(saved.passed_over)  # so that the run's newest step folder is a readable one again
        load_state(self.model, saved.weights, saved.path / WEIGHTS_FILE)
        optimizer_from_tensors(self.optimizer, saved.optimizer)
        self.step, self.tokens_seen = saved.trainer["step"], saved.trainer.get("tokens_seen", 0)
        self.elapsed = float(saved.trainer.get("elapsed_s", 0.0))

        # this rank's rows of the global data positions and carried states
        batcher, rows = self.batcher, self.train_config.batch_size
        if len(saved.trainer["data"].get("positions", ())) not in (0, batcher.total_rows):
            raise CheckpointError(f"the checkpoint streams {len(saved.trainer['data']['positions'])} rows; this run "
                                  f"has {batcher.total_rows} (batch_size * grad_accum * ranks must match)")
        try:
            batcher.load_state_dict(rank_data_state(saved, batcher.row_offset, batcher.rows))
            for m in range(self.train_config.grad_accum):
                start = batcher.row_offset + m * rows
                state, written = carry_from_tensors(saved.tensors, self.model_config, torch.arange(start, start + rows),
                                                    batcher.total_rows)
                self.carry[m] = None if state is None else state.to(self.device)
                if self.replay_write and written is not None:
                    self.written_from[m] = tuple(None if w is None else w.to(self.device) for w in written)
        except ValueError as error:
            raise CheckpointError(f"{saved.path}: {error}") from error
        if "rng.torch" not in saved.tensors:
            raise CheckpointError(f"{saved.path}: trainer.safetensors holds no rng.torch state")
        torch.set_rng_state(saved.tensors["rng.torch"])
        if "rng.cuda" in saved.tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved.tensors["rng.cuda"], self.device)

    # the loop

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps``; validate, sample and checkpoint on schedule. Returns the last metrics."""
        return RunLoop(self).run()

    def close(self) -> None:
        """Let go of the run folder (its lock is released once no trainer of this process holds it)."""
        self.run.close()


def train(model_config: BlockRecurrentConfig, config: TrainConfig, *,
          resume: bool | TrainingCheckpoint = False, run: RunFolder | None = None) -> dict[str, Any]:
    """Train (or with ``resume``, continue) a model; returns the last logged metrics.

    Under ``torchrun`` every rank calls this; the process group is left when training ends.
    """
    trainer = Trainer(model_config, config, resume=resume, run=run)
    try:
        result = trainer.fit()
        if trainer.dist.active:
            # every rank leaves together: a rank that tore its gloo connections down while rank 0 was still
            # writing the last checkpoint was seen to abort. Only on success: a rank that failed must not wait
            # here for ranks that are still training
            dist.barrier()
        return result
    finally:
        trainer.close()
        if trainer.dist.active and dist.is_initialized():
            dist.destroy_process_group()


def resume(out_dir: str | Path, *, model_config: BlockRecurrentConfig | None = None,
           **overrides: Any) -> tuple[dict[str, Any], TrainConfig]:
    """Continue the run in ``out_dir`` from its newest complete checkpoint, with ``overrides`` of the settings
    that may change (``TrainConfig.RESUMABLE``); returns the last logged metrics and the settings it ran with.

    The folder is locked before the checkpoint is read, and stays locked until training ends. ``model_config``,
    when given, must be the run's.
    """
    main = Distributed.from_env().rank == 0
    run, saved, saved_model, config = open_resumed(out_dir, main=main, model_config=model_config, **overrides)
    try:
        return train(saved_model, config, resume=saved, run=run), config
    finally:
        run.close()
