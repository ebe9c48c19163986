"""Score a model on a task by distance and depth: exact match per answer, a table, a heat map.

Every example is run through ``model.run`` in chunks of whole blocks with the state carried, so memory stays
constant however long the haystack; only the predictions at the answers are kept. An answer counts as right when
each of its tokens is the argmax given the true tokens before it (teacher forcing), which is exactly when greedy
decoding would write it.

``drop`` scores the same examples with what is carried dropped after every block (the ablations of
:func:`~block_recurrent.inference.diagnostics.drop_carried`): what the recurrent state and the XL memory each
contribute to the answers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..inference.diagnostics import DROPS, drop_carried
from ..model.checks import check_choice, check_float, check_int
from ..model.model import BlockRecurrentModel
from ..training.train_config import check_seed
from .text import Example, TaskBatch, TextTask, answer_correct, collate

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHUNK_TOKENS = 1024  # tokens per model.run call when scoring (rounded to whole blocks)


def predict(
    model: BlockRecurrentModel, batch: TaskBatch, chunk_tokens: int = CHUNK_TOKENS, drop: str | None = None
) -> tuple[Tensor, Tensor]:
    """(argmax ids (B, T), losses (B, T) in nats; 0 where unlabelled) over a batch, chunk by chunk with the state
    carried, or with what ``drop`` names dropped after every block (one block per call). Only labelled positions
    are filled in the ids (-1 elsewhere)."""
    W = model.config.block_width
    chunk = max(1, chunk_tokens // W) * W  # whole blocks: a call that ended inside a block would commit it early
    if drop is not None:
        check_choice("drop", drop, DROPS)
        chunk = W
    inputs, labels = batch.inputs.to(model.device), batch.labels.to(model.device)
    ignore = model.config.ignore_index
    ids = torch.full_like(labels, -1)
    losses = torch.zeros(labels.shape, dtype=torch.float32, device=model.device)
    state, was_training = None, model.training
    model.eval()
    try:
        with torch.inference_mode():
            for begin in range(0, inputs.shape[1], chunk):
                end = min(begin + chunk, inputs.shape[1])
                if not (labels[:, begin:] != ignore).any():
                    break  # nothing left to score: the rest is padding
                if drop is not None and state is not None:
                    state = drop_carried(state, drop)
                logits, state = model.run(inputs[:, begin:end], state)  # (B, N, V)
                scored = labels[:, begin:end] != ignore
                if scored.any():
                    ids[:, begin:end] = torch.where(scored, logits.argmax(dim=-1), -1)
                    loss = model.loss(logits, labels[:, begin:end], reduction="none").view(scored.shape)
                    losses[:, begin:end] = loss.float()
    finally:
        model.train(was_training)
    return ids.cpu(), losses.cpu()


@dataclass
class TaskScores:
    """Exact-match counts per (depth, distance) cell; rows follow ``depths``, columns ``distances``. An answer
    falls in the row of the depth nearest to the depth of the needle it needs."""

    task: dict
    chance: float
    distances: tuple[int, ...]
    depths: tuple[float, ...]
    correct: np.ndarray  # (len(depths), len(distances)) int
    total: np.ndarray  # (len(depths), len(distances)) int
    loss_sum: np.ndarray  # (len(distances),) summed answer-token losses in nats
    loss_tokens: np.ndarray  # (len(distances),) answer tokens
    gaps: dict = field(default_factory=dict)  # distance -> (shortest, longest) tokens from a needle to its answer
    drop: str | None = None  # what was dropped after every block (None: everything carried)

    @property
    def accuracy(self) -> np.ndarray:
        """(depths, distances) exact match; NaN where a cell holds no answer."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, self.correct / np.maximum(self.total, 1), np.nan)

    def by_distance(self) -> list[tuple[int, float, int, float]]:
        """(distance, exact match, answers, mean answer-token loss) per distance, over every depth."""
        out = []
        for j, distance in enumerate(self.distances):
            n = int(self.total[:, j].sum())
            loss = self.loss_sum[j] / self.loss_tokens[j] if self.loss_tokens[j] else math.nan
            out.append((distance, self.correct[:, j].sum() / n if n else math.nan, n, float(loss)))
        return out

    def table(self) -> str:
        """A markdown table: a row per distance (exact match over every depth, answer loss), then per depth."""
        head = "| distance | exact match | answers | answer loss (nats/token) | " + " | ".join(
            f"depth {d:g}" for d in self.depths) + " |"
        lines = [head, "|" + "---:|" * (4 + len(self.depths))]
        accuracy = self.accuracy
        for j, (distance, match, n, loss) in enumerate(self.by_distance()):
            cells = " | ".join("-" if np.isnan(a) else f"{a:.3f}" for a in accuracy[:, j])
            lines.append(f"| {distance} | {match:.3f} | {n} | {loss:.3f} | {cells} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"task": self.task, "chance": self.chance, "distances": list(self.distances),
                "depths": list(self.depths), "correct": self.correct.tolist(), "total": self.total.tolist(),
                "by_distance": [dict(distance=d, exact_match=m, answers=n, answer_loss=l)
                                for d, m, n, l in self.by_distance()],
                "gaps": {str(k): list(v) for k, v in self.gaps.items()}, "drop": self.drop}


def draw_examples(
    task: TextTask, distance: int, samples: int, seed: int, depths: Sequence[float] = DEFAULT_DEPTHS,
    segment_len: int | None = None,
) -> list[Example]:
    """The ``samples`` examples :func:`score` scores at ``distance``: drawn from (``seed``, ``distance``), so they
    are the same whatever the other distances; with a task that places its needle, example i at
    ``depths[i % len(depths)]``."""
    rng = np.random.default_rng([seed, distance])
    return [task.example(distance, rng, depths[i % len(depths)] if task.fixed_depth else None, segment_len)
            for i in range(samples)]


def score(
    model: BlockRecurrentModel, task: TextTask, distances: Sequence[int], *, depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 20, seed: int = 0, batch_size: int = 8, segment_len: int | None = None,
    chunk_tokens: int = CHUNK_TOKENS, drop: str | None = None,
) -> TaskScores:
    """Exact match of ``task``'s answers by distance (haystack tokens) and depth.

    For each distance, ``samples`` examples drawn from ``seed`` (the same examples for every model): with a task
    that places its needle (passkey) example i sits at ``depths[i % len(depths)]``; tasks that spread their needles
    draw them, and each answer is counted at the depth nearest its needle's. ``segment_len``: move needles off the
    multiples of it (see :meth:`TextTask.example`); by default they sit exactly where drawn, as scoring carries the
    state exactly across every boundary. ``drop``: ``"state"``, ``"memory"`` or ``"both"`` dropped after every
    block (:func:`~block_recurrent.inference.diagnostics.drop_carried`); None carries everything.
    """
    if not isinstance(model, BlockRecurrentModel):
        raise TypeError(f"model must be a BlockRecurrentModel, got {type(model).__name__}")
    if not isinstance(task, TextTask):
        raise TypeError(f"task must be a TextTask, got {type(task).__name__}")
    distances = tuple(distances)
    if not distances:
        raise ValueError("distances must name at least one distance")
    for d in distances:
        check_int("distances", d, 0)
    depths = tuple(sorted(float(d) for d in depths))
    if not depths:
        raise ValueError("depths must name at least one depth")
    for d in depths:
        check_float("depths", d, 0.0, 1.0)
    check_int("samples", samples, 1)
    check_int("batch_size", batch_size, 1)
    if drop is not None:
        check_choice("drop", drop, DROPS)
    if getattr(task.tokenizer, "vocab_size", 0) > model.config.num_tokens:
        raise ValueError(f"the task's tokenizer has {task.tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.num_tokens}")
    shape = (len(depths), len(distances))
    counts = np.zeros(shape, dtype=np.int64)
    scores = TaskScores(task.describe(), task.chance, distances, depths, counts, counts.copy(),
                        np.zeros(len(distances)), np.zeros(len(distances), dtype=np.int64), drop=drop)
    grid = np.asarray(depths)
    check_seed("seed", seed)
    for j, distance in enumerate(distances):
        examples = draw_examples(task, distance, samples, seed, depths, segment_len)
        rows = {id(e): i % len(depths) for i, e in enumerate(examples)}  # the depth each example was asked for
        gaps = []
        for begin in range(0, samples, batch_size):
            batch = collate(examples[begin : begin + batch_size], ignore_index=model.config.ignore_index)
            ids, losses = predict(model, batch, chunk_tokens, drop)
            scored = batch.labels != model.config.ignore_index
            scores.loss_sum[j] += float(losses[scored].sum())
            scores.loss_tokens[j] += int(scored.sum())
            for example, answer, right in answer_correct(batch, ids):
                row = rows[id(example)] if task.fixed_depth else int(np.abs(grid - answer.depth).argmin())
                scores.total[row, j] += 1
                scores.correct[row, j] += right
                gaps.append(answer.gap)
        scores.gaps[distance] = (min(gaps), max(gaps))
    return scores


def plot_heatmap(scores: TaskScores, path: str | Path, title: str | None = None) -> Path | None:
    """Write the distance x depth exact-match heat map to ``path`` (PNG). Needs matplotlib (the ``plot`` extra):
    without it, warns and returns None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("the heat map needs matplotlib: pip install 'block-recurrent[plot]'", stacklevel=2)
        return None
    path = Path(path)
    accuracy = scores.accuracy
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(scores.distances), 1.2 + 0.6 * len(scores.depths)))
    image = ax.imshow(np.nan_to_num(accuracy, nan=0.0), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for (row, col), value in np.ndenumerate(accuracy):
        ax.text(col, row, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(scores.distances)), [str(d) for d in scores.distances])
    ax.set_yticks(range(len(scores.depths)), [f"{d:g}" for d in scores.depths])
    ax.set_xlabel("distance (haystack tokens)")
    ax.set_ylabel("needle depth (0: farthest from the question)")
    ax.set_title(title or f"{scores.task.get('task', 'task')}: exact match (chance {scores.chance:.3g})")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
