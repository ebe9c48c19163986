"""The training loop the recall benchmarks share (qk_temperature.py, gate_init.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent import BlockRecurrentTransformer, RecurrentTrainerWrapper  # noqa: E402
from block_recurrent.training.tasks import RecallTask  # noqa: E402


def train_recall(
    model: BlockRecurrentTransformer, task: RecallTask, *, seed: int, steps: int, batch: int, lr: float,
    gate_lr_scale: float = 1.0, cell_lr_scale: float = 1.0, cell_parts: tuple[str, ...] = (),
) -> tuple[float, float]:
    """Train on fresh batches (AdamW, no weight decay, clipping at 1), then score 1,024 held-out rows.

    Returns (accuracy at the query, held-out loss). The data streams are seeded by ``seed``; the model's
    initialisation is the caller's (seed torch before building it). ``gate_lr_scale``: the fixed gates' keep
    biases learn at this multiple of ``lr`` (Adam moves a parameter about lr per step, so in 800 steps at 3e-3
    a keep bias travels 2.4 at most: from keep 0.5 to 0.92 and no further). ``cell_lr_scale``: every other
    parameter of the state cells (the write's attention, the update projection, the gates, the initial state and
    its IDs) learns at this multiple of ``lr``; with ``cell_parts``, only the cell parameters whose name (after
    ``.cell.``) starts with one of them, e.g. ``("gate",)``.
    """
    wrapper = RecurrentTrainerWrapper(model)
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        in_cell = ".cell." in name and (not cell_parts or name.split(".cell.")[1].startswith(cell_parts))
        scale = gate_lr_scale if name.endswith("keep_bias") else cell_lr_scale if in_cell else 1.0
        groups.setdefault(scale, []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr * scale} for scale, ps in groups.items()], lr=lr,
                                  weight_decay=0.0)
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs, labels = task.batch(batch, data)
        wrapper.forward_backward(inputs, labels=labels)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    inputs, labels = task.batch(1024, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        logits, _ = model.run(inputs)
        loss = model.loss(logits, labels).item()
    return RecallTask.accuracy(logits, labels), loss
