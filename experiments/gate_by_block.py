"""What a trained LSTM gate does on a task's text: its input gate (the share of the candidate written) and its forget
gate (the share of the old state kept), averaged per block, for the blocks that hold a needle (a fact, a pass key, a
pair) and for those that hold only haystack.

    python experiments/gate_by_block.py --checkpoint runs/passkey --task passkey --distance 2048

A gate that writes and keeps alike on both kinds of block lets haystack text wash a needle out of the state at the
rate it washes out anything else; a gate that shuts its input on the haystack and keeps near 1 holds the needle.
``brt inspect`` gives the same gates' averages on corpus documents, without the split by block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.model.recurrent import LSTMGate  # noqa: E402
from block_recurrent.tasks.commands import load_scored_task  # noqa: E402
from harness import add_tuned_task_arguments, require_attention_cells  # noqa: E402


def gate_by_block(model, task, distance: int, examples: int, seed: int) -> dict[str, np.ndarray]:
    """Per kind of block ("needle", "haystack"): an array (blocks, 2) of the input gate's and the forget gate's mean
    over rows' state vectors and channels, from ``examples`` examples at ``distance``, run one block per call."""
    gates = [m for m in model.modules() if isinstance(m, LSTMGate)]
    if not gates:
        raise ValueError("the model has no LSTM gate")
    seen: list[tuple[float, float]] = []

    def record(module, inputs, output):
        state, update, rewrite = inputs  # rewrite: each vector's share of the step with the slot write, else None
        _, written, keep = module.gates(update, state.dtype, rewrite)
        seen.append((written.mean().item(), keep.mean().item()))

    hook = gates[0].register_forward_hook(record)  # the first recurrent layer's gate
    W = model.config.block_width
    rows: dict[str, list] = {"needle": [], "haystack": []}
    rng = np.random.default_rng(seed)
    try:
        with torch.inference_mode():
            for _ in range(examples):
                example = task.example(distance, rng, None, None)
                tokens = torch.from_numpy(example.tokens[: len(example.tokens) // W * W])[None].to(model.device)
                seen.clear()
                state = None
                for begin in range(0, tokens.shape[1], W):
                    _, state = model.run(tokens[:, begin : begin + W], state)
                for k, values in enumerate(seen):
                    needle = any(start < (k + 1) * W and end > k * W for start, end in example.needles)
                    rows["needle" if needle else "haystack"].append(values)
    finally:
        hook.remove()
    return {kind: np.asarray(values).reshape(-1, 2) for kind, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tuned_task_arguments(parser)
    parser.add_argument("--distance", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, task = load_scored_task(args, "cpu")
    require_attention_cells(model, args.checkpoint, "gates")
    model.eval()
    print(f"{args.checkpoint}: {args.task} {task.describe()}, {args.examples} examples at distance {args.distance}")
    print("| blocks holding | blocks | input gate: mean | 10 % | 90 % | forget gate: mean | 10 % | 90 % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, values in gate_by_block(model, task, args.distance, args.examples, args.seed).items():
        written, keep = values[:, 0], values[:, 1]
        cells = [f"{np.mean(v):.3f} | {np.quantile(v, 0.1):.3f} | {np.quantile(v, 0.9):.3f}" for v in (written, keep)]
        print(f"| {kind} | {len(values)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
