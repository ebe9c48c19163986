"""Which initial temperature for L2-normalised attention? Measured on beyond-window recall.

    python experiments/qk_temperature.py                 # 3 temperatures x 2 seeds, 800 steps each

The record: docs/experiments/qk-temperature.md.

A value token sits ``distance`` blocks before the query (block width 8, XL memory of one block), so
only the recurrent state can carry it (see ``block_recurrent.tasks.RecallTask``). For each initial
temperature of the learned per-head temperature, a small model trains on fresh batches and is scored on
1024 held-out rows. The candidates: 1/sqrt(dim_head) (what the reference port really runs, by its bug),
1 (meliad's init) and 8 (the reference's intent).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from harness import RecallTask, recall_model, train_recall


def train_and_score(temperature: float, seed: int, steps: int, distance: int, batch: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    task = RecallTask(block_width=8, distance=distance, num_values=32)
    # two layers; gate_projection: the architecture the recorded results were measured on
    model = recall_model(task, depth=2, qk_rmsnorm_scale=temperature, gate_projection=True)
    score = train_recall(model, task, seed=seed, steps=steps, batch=batch, lr=2e-3)
    return score.accuracy, score.loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--distance", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    candidates = {"1/sqrt(dim_head) = 0.25 (reference as shipped)": 16**-0.5, "1 (meliad; our default)": 1.0,
                  "8 (reference's intent)": 8.0}
    print(f"recall {args.distance} blocks back, 32 values (chance 0.031), {args.steps} steps, batch {args.batch}\n")
    print("| initial temperature | accuracy per seed | mean accuracy | held-out loss (mean) |")
    print("|---|---|---|---|")
    for name, temperature in candidates.items():
        began = time.time()
        results = [train_and_score(temperature, seed, args.steps, args.distance, args.batch) for seed in range(args.seeds)]
        accuracies = [a for a, _ in results]
        losses = [loss for _, loss in results]
        print(f"| {name} | {', '.join(f'{a:.2f}' for a in accuracies)} | {sum(accuracies) / len(accuracies):.2f} "
              f"| {sum(losses) / len(losses):.2f} |", flush=True)
        print(f"<!-- {time.time() - began:.0f} s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
