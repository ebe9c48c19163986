"""Diagnostics of a trained model on its own documents: what the carried XL memory and recurrent state each
contribute, the loss by position to the end of the longest document, and the keep values of the trained gates.

- :func:`drop_carried` / :func:`evaluate_ablated`: evaluation that drops what is carried from block to block.
  ``"state"``: every block reads the learned initial state (the XL memory still carried); ``"memory"``: every
  block's memory slots are invalid, so its tokens see only their own block (the state still carried);
  ``"both"``: each block alone. The difference with the carried score is what the dropped part contributes.
- :func:`log_curve`: bits per byte in log-spaced ranges of positions ([0, 1 K), [1 K, 2 K), ... up to 1 M, then
  1 M and beyond), every document pooled, from results scored with ``bucket_size``.
- :func:`keep_values`: per gate of every recurrent layer, the share of the old state kept per channel: the fixed
  gate's sigmoid(b), the LSTM gate's forget gate averaged over the documents' blocks, and the half-lives in blocks
  they mean (k ** h = 1/2); for the LSTM gate also its input gate (the share of the new candidate written) and how
  far the keep moves from one update to another: a gate that keeps and writes the same whatever the block holds
  cannot hold a fact through text that follows it.
- :func:`state_gradients`: how much of a block's loss gradient reaches the state written d blocks before it, as a
  segment of several blocks sees it in training: the norm of dL/ds per distance d. The state's gradient across
  blocks is what a segment of many blocks trains and a segment of one block never sees; how much of it is left
  after d updates says whether the segment's end or the state's own decay bounds how far back the state learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..model.checks import check_choice, check_int
from ..model.model import BlockRecurrentModel
from ..model.recurrent import DeltaStateCell, FixedGate
from ..model.state import ModelState, XLMemory
from .decoding import eval_mode, eval_no_grad
from .evaluation import EvalResult, curve_range, evaluate_documents, position_curve

DROPS = ("state", "memory", "both")
LN2 = math.log(2)


# what is carried, dropped


def drop_carried(state: ModelState, drop: str) -> ModelState:
    """``state`` without what ``drop`` names: ``"state"`` every recurrent state back to the learned initial one
    (None), ``"memory"`` every memory slot invalid (the block that follows sees none of them), ``"both"``."""
    check_choice("drop", drop, DROPS)
    memories, states = state.memories, state.states
    if drop in ("memory", "both"):
        memories = tuple(
            None if m is None else XLMemory(m.keys, m.values, torch.zeros(m.keys.shape[:2], dtype=torch.bool,
                                                                          device=m.keys.device))
            for m in memories
        )
    if drop in ("state", "both"):
        states = (None,) * len(states)
    return ModelState(memories, states)


def evaluate_ablated(
    model: BlockRecurrentModel, documents: Sequence[Tensor], drop: str | None, *, batch_size: int = 16,
    bytes_per_token: float = 1.0, bucket_size: int | None = None,
) -> list[EvalResult]:
    """:func:`~.evaluation.evaluate_documents` with what ``drop`` names (see :func:`drop_carried`; None: nothing)
    dropped after every block: one result per document, each scored from a fresh state, one block per call."""
    if drop is None:
        return evaluate_documents(model, documents, batch_size=batch_size, bytes_per_token=bytes_per_token,
                                  bucket_size=bucket_size)
    check_choice("drop", drop, DROPS)
    return evaluate_documents(model, documents, batch_size=batch_size, segment_len=model.config.block_width,
                              bytes_per_token=bytes_per_token, bucket_size=bucket_size,
                              carry=lambda state: drop_carried(state, drop))


# loss by position, in log-spaced ranges


def log_edges(first: int = 1024, last: int = 1 << 20) -> list[int]:
    """Range starts 0, ``first``, 2 ``first``, 4 ``first``, ... up to ``last`` (powers of two of ``first``)."""
    check_int("first", first, 1)
    check_int("last", last, first)
    edges, edge = [0], first
    while edge <= last:
        edges.append(edge)
        edge *= 2
    return edges


def log_curve(results: Sequence[EvalResult], edges: Sequence[int] | None = None, bytes_per_token: float = 1.0
              ) -> list[tuple[int, int | None, float, int]]:
    """(begin, end or None for the last, open range, bits per byte, predictions) per range between ``edges``
    (default :func:`log_edges`), every document pooled; ranges no document reaches are left out. The results must
    be scored with a ``bucket_size`` that divides every edge."""
    return pool_ranges(position_curve(results, bytes_per_token), edges)


def pool_ranges(curve: Sequence[tuple[int, float, int]], edges: Sequence[int] | None = None
                ) -> list[tuple[int, int | None, float, int]]:
    """A :func:`~.evaluation.position_curve` (bucket start, bits per byte, predictions) pooled into the ranges
    between ``edges`` (default :func:`log_edges`), as :func:`log_curve` returns them."""
    edges = log_edges() if edges is None else list(edges)
    size = curve[1][0] - curve[0][0] if len(curve) > 1 else None
    if size is not None and any(edge % size for edge in edges):
        raise ValueError(f"edges {edges} are not multiples of the curve's bucket size {size}")
    ranges = []
    for begin, end in zip(edges, [*edges[1:], None]):
        bits, count = curve_range(curve, begin, end)
        if count:
            ranges.append((begin, end, bits, count))
    return ranges


def _size(n: int) -> str:
    if n and n % (1 << 20) == 0:
        return f"{n >> 20} M"
    return f"{n >> 10} K" if n and n % 1024 == 0 else str(n)


def range_label(begin: int, end: int | None) -> str:
    return f"{_size(begin)}+" if end is None else f"{_size(begin)}-{_size(end)}"


def whole(results: Sequence[EvalResult], bytes_per_token: float = 1.0) -> float:
    """Bits per byte over every prediction of ``results`` pooled."""
    return sum(r.loss_sum for r in results) / sum(r.tokens for r in results) / LN2 / bytes_per_token


def format_curves(rows: dict[str, tuple[float, list]]) -> str:
    """A markdown table: per row name, the whole score and each :func:`log_curve` range, and the bytes per range."""
    ranges = max((curve for _, curve in rows.values()), key=len)
    lines = ["| | whole | " + " | ".join(range_label(b, e) for b, e, _, _ in ranges) + " |",
             "|---|---:|" + "---:|" * len(ranges)]
    for name, (total, curve) in rows.items():
        by_range = {(b, e): bits for b, e, bits, _ in curve}
        cells = [f"{by_range[(b, e)]:.3f}" if (b, e) in by_range else "-" for b, e, _, _ in ranges]
        lines.append(f"| {name} | {total:.4f} | " + " | ".join(cells) + " |")
    lines.append("| predictions | | " + " | ".join(f"{n:,}" for _, _, _, n in ranges) + " |")
    return "\n".join(lines)


# the gates' keep values


@dataclass(frozen=True)
class KeepSummary:
    """The keep values of one gate: the share of its old state kept per channel, ``keep`` (dim,)."""

    layer: int  # the recurrent layer (1-based)
    gate: str  # "gate", or "ff_gate" (the second gate of state_update="dual")
    kind: str  # "fixed" or "lstm"
    keep: Tensor  # (dim,) float64: sigmoid(b) for the fixed gate, the forget gate's mean over blocks for the LSTM
    blocks: int  # slot updates (rows x slots x blocks) the LSTM's keep was averaged over (0: none)
    write: Tensor | None = None  # (dim,) float64: the share of the candidate written (LSTM: the input gate's mean)
    keep_range: tuple[float, float] | None = None  # 10 % and 90 % over slot updates of the keep's channel mean
    # state_write="slots": measured over documents, keep and write include each vector's share of the step; with
    # no documents they are the gate's alone, which a vector takes only in proportion to the tokens it wins
    slot_write: bool = False

    def half_lives(self) -> Tensor:
        """Blocks until half of a written value is left, per channel: log(1/2) / log(keep) (inf at keep 1)."""
        keep = self.keep.clamp(1e-12, 1.0)
        return torch.where(keep < 1, math.log(0.5) / torch.log(keep), torch.full_like(keep, math.inf))


def _gates(model: BlockRecurrentModel):
    for layer, cell in zip(model.config.recurrent_layers, model.cells):
        if isinstance(cell, DeltaStateCell):
            continue  # no gate: each token's write strength takes its place
        yield layer, "gate", cell.gate
        if cell.ff_gate is not None:
            yield layer, "ff_gate", cell.ff_gate


def _keep_and_write(gate: nn.Module, update: Tensor, dtype: torch.dtype, rewrite: Tensor | None
                    ) -> tuple[Tensor, Tensor]:
    """A gate's keep and write share for one call's ``update`` (and slot ``rewrite``), per row, slot and channel."""
    if isinstance(gate, FixedGate):
        keep = gate.keep(update, dtype, rewrite).expand(update.shape)
        return keep, 1 - keep
    _, written, keep = gate.gates(update, dtype, rewrite)
    return keep, written


def keep_values(model: BlockRecurrentModel, documents: Sequence[Tensor] | None = None, *, batch_size: int = 16
                ) -> list[KeepSummary]:
    """The keep values of every gate (see :class:`KeepSummary`). An LSTM gate's keep depends on what is written,
    and with the slot write (``state_write="slots"``) any gate's keep depends on the tokens each state vector wins:
    such keeps are averaged over every block of ``documents`` (scored as :func:`evaluate_documents` scores them), or
    taken at a zero update when none are given."""
    slots = model.config.state_write == "slots"
    sums: dict[tuple[int, str], list] = {}
    hooks = []
    for layer, name, gate in _gates(model):
        if (isinstance(gate, FixedGate) and not slots) or not documents:
            continue
        # per channel: the summed keep and write; per slot update: the keep's channel mean (their count)
        sums[layer, name] = {"keep": torch.zeros(model.config.dim, dtype=torch.float64),
                             "write": torch.zeros(model.config.dim, dtype=torch.float64), "per_update": []}

        def record(module, inputs, output, key=(layer, name)):
            state, update, rewrite = inputs  # the cell passes the rewrite positionally (None without slots)
            keep, written = _keep_and_write(module, update, state.dtype, rewrite)
            keep, written = keep.double().reshape(-1, keep.shape[-1]), written.double().reshape(-1, keep.shape[-1])
            sums[key]["keep"] += keep.sum(dim=0).cpu()
            sums[key]["write"] += written.sum(dim=0).cpu()
            sums[key]["per_update"].append(keep.mean(dim=-1).cpu())

        hooks.append(gate.register_forward_hook(record))
    try:
        if hooks:  # one block per call: no block of padding alone is written, so none counts
            evaluate_documents(model, list(documents), batch_size=batch_size, segment_len=model.config.block_width)
    finally:
        for hook in hooks:
            hook.remove()
    summaries = []
    with eval_no_grad(model):
        for layer, name, gate in _gates(model):
            kind = "fixed" if isinstance(gate, FixedGate) else "lstm"
            keep_range = None
            if (layer, name) in sums and sums[layer, name]["per_update"]:
                per_update = torch.cat(sums[layer, name]["per_update"])
                blocks = len(per_update)
                keep, write = sums[layer, name]["keep"] / blocks, sums[layer, name]["write"] / blocks
                keep_range = tuple(torch.quantile(per_update, torch.tensor([0.1, 0.9], dtype=per_update.dtype))
                                   .tolist())
            else:
                zero = torch.zeros(1, model.config.dim, device=model.device, dtype=model.dtype)
                blocks = 0
                keep, write = (t[0] for t in _keep_and_write(gate, zero, torch.float64, None))
            summaries.append(KeepSummary(layer, name, kind, keep.double().cpu(), blocks, write.double().cpu(),
                                         keep_range, slots))
    return summaries


def format_keep(summaries: Sequence[KeepSummary]) -> str:
    """A markdown table of keep values and half-lives: minimum, 10 %, median, 90 %, maximum over channels."""
    def quantiles(t: Tensor) -> list[float]:
        return torch.quantile(t, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=t.dtype)).tolist()

    lines = ["| layer | gate | keep: min | 10 % | median | 90 % | max | half-life in blocks: median | 90 % | max "
             "| write: median | keep per update: 10 % | 90 % | measured on |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        keep, lives = quantiles(s.keep), quantiles(s.half_lives())
        write = "-" if s.write is None else f"{s.write.median().item():.3f}"
        spread = ["-", "-"] if s.keep_range is None else [f"{k:.3f}" for k in s.keep_range]
        where = (f"{s.blocks:,} slot updates" if s.blocks else "its biases" if s.kind == "fixed"
                 else "a zero update (no documents)")
        if s.slot_write and not s.blocks:
            where += ", before each vector's share of the step"
        lines.append(f"| {s.layer} | {s.gate} ({s.kind}) | " + " | ".join(f"{k:.3f}" for k in keep) + " | "
                     + " | ".join(f"{h:.1f}" for h in lives[2:]) + f" | {write} | " + " | ".join(spread)
                     + f" | {where} |")
    return "\n".join(lines)


# the gradient reaching the state across blocks


@dataclass(frozen=True)
class StateGradient:
    """The loss gradient that reaches one recurrent layer's state across blocks.

    ``norms[d]``: over the windows scored, the mean of ||dL/ds|| (per row, over the state's slots and channels),
    where L is the mean loss of a window's last block and s the state that block reads (d = 0) or the state d
    writes before it (the state the block d blocks earlier read). ``median_shares[d]``: the median over the
    windows of each window's own share ||dL/ds_d|| / ||dL/ds_0||, which a few windows whose gradient grows
    cannot move as they move the mean (None where it was not recorded).
    """

    layer: int  # the recurrent layer (1-based)
    norms: Tensor  # (span,) float64
    windows: int  # rows the norms were averaged over
    through_memory: bool  # False: the XL memory carried no gradient from block to block (the state's path alone)
    median_shares: Tensor | None = None  # (span,) float64

    def relative(self) -> Tensor:
        """``norms`` over the norm at d = 0: the share of the (mean) gradient left after d state updates."""
        return self.norms / self.norms[0]

    @property
    def path(self) -> str:
        """"every path", or "state alone" where the XL memory carried no gradient."""
        return "every path" if self.through_memory else "state alone"


def _windows(documents: Sequence[Tensor], length: int, max_windows: int) -> list[Tensor]:
    """Consecutive windows of ``length`` tokens cut from every document (the rest of a document dropped), at most
    ``max_windows`` of them, evenly spaced over the list so that every part of the documents is drawn."""
    windows = [doc[begin : begin + length] for doc in documents for begin in range(0, len(doc) - length + 1, length)]
    if len(windows) > max_windows:
        picks = torch.linspace(0, len(windows) - 1, max_windows).round().long().tolist()
        windows = [windows[i] for i in picks]
    return windows


def state_gradients(
    model: BlockRecurrentModel, documents: Sequence[Tensor], *, span: int = 8, warmup: int = 8,
    max_windows: int = 64, batch_size: int = 16, through_memory: bool = True,
) -> list[StateGradient]:
    """Per recurrent layer, the gradient of a block's loss with respect to the states of the ``span`` - 1 blocks
    before it (see :class:`StateGradient`), over windows of ``warmup`` + ``span`` blocks cut from ``documents``.

    Each window runs its first ``warmup`` blocks without gradient (so the state is one the model has written),
    then ``span`` blocks one per call with the graph kept, as a training segment of ``span`` blocks runs them;
    only the last block is scored. ``through_memory`` False detaches the XL memory after every block, so the
    gradient reaches an earlier state through the state's own updates alone. Dropout is off (eval mode)."""
    check_int("span", span, 1)
    check_int("warmup", warmup, 1)
    check_int("max_windows", max_windows, 1)
    check_int("batch_size", batch_size, 1)
    if not model.config.recurrent_layers:
        raise ValueError("state_gradients needs a model with a recurrent layer (recurrent_layers is empty)")
    W = model.config.block_width
    windows = _windows(documents, (warmup + span) * W + 1, max_windows)
    if not windows:
        raise ValueError(f"no document holds a window of warmup + span = {warmup + span} blocks of {W} tokens "
                         "and one more token")
    norms = torch.zeros(len(model.cells), len(windows), span, dtype=torch.float64)  # per window row
    with eval_mode(model):
        for first in range(0, len(windows), batch_size):
            tokens = torch.stack(windows[first : first + batch_size]).to(model.device)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            with torch.no_grad():
                _, state = model.run(inputs[:, : warmup * W])
            state = ModelState(state.memories, tuple(s.detach().requires_grad_() for s in state.states))
            read = []  # per block of the span, the states it reads
            with torch.enable_grad():
                for block in range(warmup, warmup + span):
                    read.append(state.states)
                    if block > warmup and not through_memory:
                        state = ModelState(tuple(None if m is None else m.detach() for m in state.memories),
                                           state.states)
                    hidden, state = model.forward_block(model.embed(inputs[:, block * W : (block + 1) * W]), state)
                losses = model.loss(model.logits(hidden), labels[:, -W:], reduction="none")
                loss = losses.view(len(tokens), W).mean(dim=1).sum()  # rows are independent: summed
                flat = [s for states in read for s in states]
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
            for index, grad in enumerate(grads):
                block, cell = divmod(index, len(model.cells))
                if grad is not None:  # no path (the state is not read) leaves a zero gradient
                    rows = slice(first, first + len(tokens))
                    norms[cell, rows, span - 1 - block] = grad.double().flatten(1).norm(dim=1).cpu()
    # each window's own share of its d = 0 gradient; a window with none at d = 0 has no share (NaN, which the
    # median skips). nanquantile, not nanmedian: for an even count the median is the mean of the middle two,
    # where nanmedian returns the lower one
    nearest = norms[:, :, :1]
    shares = torch.where(nearest > 0, norms / nearest, torch.nan)
    return [StateGradient(layer, norms[i].mean(dim=0), len(windows), through_memory,
                          torch.nanquantile(shares[i], 0.5, dim=0))
            for i, layer in enumerate(model.config.recurrent_layers)]


def format_state_gradients(gradients: Sequence[StateGradient]) -> str:
    """A markdown table: per distance d, each result's share of the gradient left after d state updates
    (``relative``, then the windows' median share in brackets where recorded), a column per path and layer, and
    the norm at d = 0 in the last row."""
    def cell(g: StateGradient, d: int) -> str:
        if d >= len(g.norms):
            return "-"
        median = "" if g.median_shares is None else f" ({g.median_shares[d].item():.3f})"
        return f"{g.relative()[d].item():.3f}{median}"

    span = max(len(g.norms) for g in gradients)
    lines = ["| blocks back | " + " | ".join(f"{g.path}: layer {g.layer}" for g in gradients) + " |",
             "|---:|" + "---:|" * len(gradients)]
    for d in range(span):
        lines.append(f"| {d} | " + " | ".join(cell(g, d) for g in gradients) + " |")
    lines.append("| norm at 0 | " + " | ".join(f"{g.norms[0].item():.3g}" for g in gradients) + " |")
    return "\n".join(lines)
