"""Does the fixed gate need its own projection? Beyond-window recall with and without it.

    python experiments/gate_projection.py                  # seeds 0-7, both settings, 2 worker processes
    python experiments/gate_projection.py --seeds 3 --jobs 1

The record: docs/experiments/gate-projection.md.

The fixed gate computes c' = c * g + z * (1 - g). With ``gate_projection=True`` (the reference port) z is
W_z h + b_z, a second linear map after the state's output projection h; with ``gate_projection=False``
(meliad, the paper's official code) the output projection is W_z. Recall a value 4 blocks back (block width
8, 16 values, chance 0.0625; ``block_recurrent.tasks.RecallTask``) with a 3-layer, width-64 model,
recurrence in layer 2, 700 AdamW steps of 32 fresh rows, scored on 1,024 held-out rows; one torch thread per
run. Results do not depend on ``--jobs``.
"""

from __future__ import annotations

import argparse
import time

import torch

from harness import RecallTask, map_units, recall_model, train_recall


def recall_accuracy(unit: tuple[bool, int, int]) -> float:
    projection, seed, steps = unit
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    task = RecallTask(block_width=8, distance=4, num_values=16)
    model = recall_model(task, gate_projection=projection)
    return train_recall(model, task, seed=seed, steps=steps, batch=32, lr=3e-3).accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    args = parser.parse_args(argv)
    units = [(projection, seed, args.steps) for projection in (True, False) for seed in range(args.seeds)]
    began = time.time()
    accuracies = map_units(recall_accuracy, units, args.jobs)
    print(f"| fixed gate | recall accuracy per seed 0-{args.seeds - 1} (chance 0.0625) | seeds >= 0.99 |")
    print("|---|---|---|")
    for projection in (True, False):
        row = [a for (p, *_), a in zip(units, accuracies) if p == projection]
        name = "`gate_projection=True` (reference)" if projection else "`gate_projection=False` (meliad; default)"
        print(f"| {name} | {', '.join(f'{a:.3f}' for a in row)} | {sum(a >= 0.99 for a in row)} of {len(row)} |")
    print(f"\nwall time: {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
