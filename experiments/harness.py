"""What the research scripts share: the optimiser (the trainer's parameter groups), one training step, the recall
trainer, ``--set FIELD=JSON``, the held-out split as tensors, a checkpoint-and-task's arguments, and running
independent units in worker processes.

The scripts import it as a sibling (``from harness import ...``): run them from anywhere as
``python experiments/NAME.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from block_recurrent import BlockRecurrentModel, BlockRecurrentTransformer, RecurrentTrainerWrapper, save_pretrained
from block_recurrent.training.data import ByteTokenizer, TokenCorpus, load_documents, split_documents
from block_recurrent.tasks import RecallTask
from block_recurrent.tasks.commands import TASK_NAMES, TUNE_FILE, load_scored_task
from block_recurrent.training.trainer import parameter_groups

__all__ = ["RecallTask", "RecallScore", "adamw", "add_tuned_task_arguments", "held_out_documents", "map_units",
           "parse_sets", "recall_model", "train_recall", "train_step"]

# the recall runs' tiny model: width 64, 3 layers of 4 heads of 16, recurrence in layer 2, 8 state vectors
RECALL_SHAPE = dict(dim=64, depth=3, heads=4, dim_head=16, num_state_vectors=8, recurrent_layers=(2,))


def adamw(
    model: BlockRecurrentModel, lr: float, *, state_lr_scale: float = 1.0, keep_bias_lr_scale: float = 1.0,
    cell_parts: tuple[str, ...] = (),
) -> torch.optim.AdamW:
    """AdamW without weight decay over the trainer's parameter groups (``parameter_groups``: the state cells at
    ``state_lr_scale`` x ``lr``), plus the two levers the recall runs measured:

    - ``keep_bias_lr_scale``: the fixed gates' keep biases at this multiple of ``lr``, whatever ``state_lr_scale``
      is (the recorded runs kept them out of the cells' scale). Adam moves a parameter about lr per step, so in
      800 steps at 3e-3 a keep bias travels 2.4 at most: from keep 0.5 to 0.92 and no further.
    - ``cell_parts``: ``state_lr_scale`` only for the cell parameters whose name after ``.cell.`` starts with one
      of these (e.g. ``("gate", "to_update")``); the rest of the cell at ``lr``.
    """
    names = {id(p): name for name, p in model.named_parameters()}

    def scale(p: torch.Tensor, group_scale: float) -> float:
        name = names[id(p)]
        if name.endswith("keep_bias"):
            return keep_bias_lr_scale
        if cell_parts and ".cell." in name and not name.split(".cell.")[1].startswith(cell_parts):
            return 1.0
        return group_scale

    groups: dict[float, list] = {}
    for group in parameter_groups(model, weight_decay=0.0, state_lr_scale=state_lr_scale):
        for p in group["params"]:
            groups.setdefault(scale(p, group["lr_scale"]), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr * s, "lr_scale": s} for s, ps in groups.items()], lr=lr,
                             weight_decay=0.0)


def train_step(wrapper: RecurrentTrainerWrapper, optimizer: torch.optim.Optimizer, inputs, labels, **kwargs):
    """One step: truncated back-propagation over the segments, clipping at 1, AdamW; the ``SegmentResult``."""
    result = wrapper.forward_backward(inputs, labels=labels, **kwargs)
    torch.nn.utils.clip_grad_norm_(wrapper.transformer.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def recall_model(task: RecallTask, **changes) -> BlockRecurrentTransformer:
    """``RECALL_SHAPE`` sized for ``task`` (its vocabulary, blocks and row length); ``changes``: config fields on top,
    the shape's included. Seed torch before calling it."""
    sized = dict(num_tokens=task.vocab_size, block_width=task.block_width, max_seq_len=task.length)
    return BlockRecurrentTransformer(**{**RECALL_SHAPE, **sized, **changes})


class RecallScore(NamedTuple):
    accuracy: float  # at the query, on the held-out rows
    loss: float  # held-out cross-entropy over every labelled position
    tokens_per_s: float  # training tokens per second of wall clock


def train_recall(
    model: BlockRecurrentModel, task: RecallTask, *, seed: int, steps: int, batch: int, lr: float,
    eval_rows: int = 1024, **levers,
) -> RecallScore:
    """Train on fresh batches of ``task`` (see :func:`train_step`), then score ``eval_rows`` held-out rows.

    The data are seeded by ``seed`` (held-out rows by 10,000 + seed); the model's initialisation is the caller's
    (seed torch before building it). ``levers``: :func:`adamw`'s keywords.
    """
    wrapper, optimizer = RecurrentTrainerWrapper(model), adamw(model, lr, **levers)
    data = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    for _ in range(steps):
        train_step(wrapper, optimizer, *task.batch(batch, data))
    tokens_per_s = steps * batch * task.length / max(time.perf_counter() - began, 1e-9)
    model.eval()
    inputs, labels = task.batch(eval_rows, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        logits, _ = model.run(inputs)
        loss = model.loss(logits, labels).item()
    return RecallScore(RecallTask.accuracy(logits, labels), loss, tokens_per_s)


def parse_sets(items: Sequence[str]) -> dict:
    """``FIELD=JSON`` items (the scripts' repeatable ``--set``) as config changes: ``gate="lstm"``, ``kv_heads=4``."""
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        changes[name] = json.loads(value)
    return changes


def held_out_documents(data: str | None = None) -> list[torch.Tensor]:
    """The held-out documents of ``brt train``'s fixed split as byte tensors (T,); ``data`` None: the built-in
    corpus (96 files, 1.41 M bytes on CPython 3.11)."""
    held_out = TokenCorpus.from_documents(split_documents(load_documents(data))[1], ByteTokenizer())
    return [torch.from_numpy(held_out.document(i).astype("int64")) for i in range(len(held_out))]


def add_tuned_task_arguments(parser: argparse.ArgumentParser, task: str | None = None) -> None:
    """``--checkpoint`` and the task to score it on: ``--task`` (unless ``task`` fixes it), ``--haystack`` and
    ``--task-option``, as ``brt eval --task`` takes them (load both with
    :func:`block_recurrent.tasks.commands.load_scored_task`)."""
    parser.add_argument("--checkpoint", required=True)
    if task is None:
        parser.add_argument("--task", required=True, choices=TASK_NAMES)
    else:
        parser.set_defaults(task=task)
    parser.add_argument("--haystack", default=None, help="default: as tuned, else the task's default")
    parser.add_argument("--task-option", action="append", default=[], metavar="NAME=JSON")


def load_recurrent_model(args: argparse.Namespace, **options):
    """(model, task) of ``args`` (:func:`add_tuned_task_arguments`; ``options`` override the task's), the model in
    eval mode; one without a recurrent layer is refused: these scripts measure its state."""
    model, task = load_scored_task(args, "cpu", **options)
    if not model.config.recurrent_layers:
        raise ValueError(f"{args.checkpoint} has no recurrent layer")
    return model, task


def require_attention_cells(model: BlockRecurrentModel, checkpoint: str, needs: str) -> None:
    """Refuse a model whose state is a delta-rule memory (``state_write="delta"``): it has no ``needs`` (gates, or
    state attentions) for the calling script to measure or edit."""
    if model.config.state_write == "delta":
        raise ValueError(f"{checkpoint} keeps its state as a delta-rule memory (state_write='delta'), which has no "
                         f"{needs}")


def save_edited_checkpoint(model: BlockRecurrentModel, out: str, tokenizer_file, folder: Path) -> None:
    """Save ``model``, edited from the checkpoint in ``folder`` (``load_model``'s last two results), to ``out`` with
    that checkpoint's tokenizer and ``tune.json``, so that ``brt tune`` and ``brt eval --task`` read the task it was
    tuned on."""
    save_pretrained(model, out, tokenizer_file=tokenizer_file)
    if (folder / TUNE_FILE).exists():
        shutil.copy(folder / TUNE_FILE, Path(out) / TUNE_FILE)


def map_units(work: Callable, units: list, jobs: int, start: str = "fork") -> list:
    """``[work(u) for u in units]``, in ``jobs`` worker processes when ``jobs`` > 1 (each run sets its own threads
    and seeds, so results do not depend on ``jobs``)."""
    if jobs <= 1:
        return [work(unit) for unit in units]
    import multiprocessing

    with multiprocessing.get_context(start).Pool(jobs) as pool:
        return pool.map(work, units, chunksize=1)
