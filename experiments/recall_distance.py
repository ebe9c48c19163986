"""How far back can the recurrent state carry a value? Recall accuracy against distance in blocks.

    python experiments/recall_distance.py                                  # distances 4 6 8 12 16, seeds 0-2
    python experiments/recall_distance.py --distances 8 --seeds 3 --set gate_keep_init=2.0

The record: docs/experiments/recall-distance.md and docs/experiments/slow-state-cells.md.

``block_recurrent.tasks.RecallTask``: block width 8, one of 32 value tokens at position 0, filler tokens, and
a query ``distance`` blocks later whose label is the value (chance 1/32). Out of every attention window from
distance 2 on: only the state can carry the value. The model is the library's default architecture at the
comparison's tiny shape (docs/experiments/variants-comparison.md): width 64, 3 layers, 4 heads of 16, recurrence
in layer 2, 8 state vectors, the fixed gate without its own projection, the default initialisation and qk
temperature;
``--set FIELD=JSON`` changes a config field (to try a lever). 800 AdamW steps (lr 3e-3, no weight decay,
clipping at 1) of 32 fresh rows, then 1,024 held-out rows. One torch thread per run, ``--jobs`` runs side by
side; results do not depend on ``--jobs``.
"""

from __future__ import annotations

import argparse
import time

import torch

from harness import RecallTask, map_units, parse_sets, recall_model, train_recall


def recall_accuracy(unit: tuple) -> tuple[float, float]:
    """(accuracy, seconds) of one run: (distance, seed, steps, config overrides, keep-bias lr scale, cell lr
    scale, cell parts)."""
    distance, seed, steps, overrides, gate_lr_scale, cell_lr_scale, cell_parts = unit
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    task = RecallTask(block_width=8, distance=distance, num_values=32)
    model = recall_model(task, **overrides)  # --set may also change the shape
    began = time.perf_counter()
    score = train_recall(model, task, seed=seed, steps=steps, batch=32, lr=3e-3, keep_bias_lr_scale=gate_lr_scale,
                         state_lr_scale=cell_lr_scale, cell_parts=cell_parts)
    return score.accuracy, time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distances", type=int, nargs="+", default=[4, 6, 8, 12, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="a config field, as compare_variants.py takes it, e.g. gate_keep_init=2.0 (repeatable)")
    parser.add_argument("--gate-lr-scale", type=float, default=1.0,
                        help="the fixed gates' keep biases learn at this multiple of the learning rate")
    parser.add_argument("--cell-lr-scale", type=float, default=1.0,
                        help="the rest of the state cells' parameters learn at this multiple of the learning rate")
    parser.add_argument("--cell-parts", nargs="+", default=[], metavar="PREFIX",
                        help="--cell-lr-scale only for the cell parameters named so (after '.cell.'), e.g. gate "
                             "to_update initial_state")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    args = parser.parse_args(argv)
    overrides = parse_sets(args.set)
    # the longest rows first, so the two workers finish together
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    units = [(d, s, args.steps, overrides, args.gate_lr_scale, args.cell_lr_scale, tuple(args.cell_parts))
             for d in sorted(args.distances, reverse=True) for s in seeds]
    began = time.time()
    results = map_units(recall_accuracy, units, args.jobs)
    by_unit = dict(zip([(d, s) for d, s, *_ in units], results))
    setting = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "library defaults"
    if args.gate_lr_scale != 1.0:
        setting += f", keep biases at {args.gate_lr_scale:g}x the learning rate"
    if args.cell_lr_scale != 1.0:
        parts = f" ({', '.join(args.cell_parts)} only)" if args.cell_parts else ""
        setting += f", state cells{parts} at {args.cell_lr_scale:g}x the learning rate"
    print(f"recall of 1 of 32 values (chance 0.031), {args.steps} steps, {setting}\n")
    print(f"| distance (blocks) | accuracy per seed {seeds[0]}-{seeds[-1]} | seeds >= 0.9 | seconds per run |")
    print("|---:|---|---:|---:|")
    for d in sorted(args.distances):
        row = [by_unit[(d, s)] for s in seeds]
        accs = ", ".join(f"{a:.3f}" for a, _ in row)
        print(f"| {d} | {accs} | {sum(a >= 0.9 for a, _ in row)} of {len(row)} | {sum(t for _, t in row) / len(row):.0f} |")
    print(f"\nwall time: {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
