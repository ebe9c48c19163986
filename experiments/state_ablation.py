"""Does a trained model use its recurrent state? Held-out bits per byte with the state carried, and with it reset
to the learned initial state after every block (the XL memory is carried in both).

    python experiments/state_ablation.py --checkpoint runs/brt

The record: docs/experiments/state-ablation.md.

Scores every held-out file of the built-in corpus from a fresh state (``evaluate_documents``, 16 side by side,
bf16 autocast where native), twice: as trained, and with ``commit_block`` replaced by one that returns the
learned initial state instead of the written one, so the tokens of every block read the same state whatever
came before. The difference is what the state carries across blocks. Also reported by position in the file
(bytes 0-1 K, 1-4 K, 4-16 K, 16-32 K, 32 K+): the state can only help where there is something before the
attention window, and should help more the more there is.
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import nullcontext

import torch

from block_recurrent.inference.evaluation import curve_range, evaluate_documents, position_curve
from block_recurrent.model.state import ModelState
from block_recurrent.persistence.checkpoint import from_pretrained
from block_recurrent.training.precision import native_bf16
from harness import held_out_documents

BUCKET = 1024
RANGES = [(0, 1), (1, 4), (4, 16), (16, 32), (32, None)]  # in buckets of 1 K


def score(model, docs, autocast) -> tuple[float, list[tuple[float, int]]]:
    """(bits per byte over everything, per range of positions (bits per byte, bytes))."""
    with autocast:
        results = evaluate_documents(model, docs, bucket_size=BUCKET)
    total = sum(r.loss_sum for r in results) / sum(r.tokens for r in results) / math.log(2)
    curve = position_curve(results)
    return total, [curve_range(curve, low * BUCKET, None if high is None else high * BUCKET) for low, high in RANGES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/brt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="a text file or folder instead of the built-in corpus")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = from_pretrained(args.checkpoint).eval()
    docs = held_out_documents(args.data)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16(torch.device("cpu")) else nullcontext()

    began = time.perf_counter()
    carried = score(model, docs, autocast)
    commit = model.commit_block

    def commit_without_state(state, views, caches):
        after = commit(state, views, caches)
        return ModelState(after.memories, (None,) * len(after.states))  # None: the learned initial state

    model.commit_block = commit_without_state
    reset = score(model, docs, autocast)
    model.commit_block = commit

    print(f"{args.checkpoint}: {len(docs)} held-out files, {sum(len(d) for d in docs)} bytes, "
          f"{time.perf_counter() - began:.0f} s\n")
    header = " | ".join(f"bytes {low}-{high} K" if high else f"bytes {low} K+" for low, high in RANGES)
    print(f"| state | whole split | {header} |")
    print("|---|---:|" + "---:|" * len(RANGES))
    for name, (total, ranges) in (("carried (as trained)", carried), ("reset after every block", reset)):
        print(f"| {name} | {total:.4f} | " + " | ".join(f"{bpb:.4f}" for bpb, _ in ranges) + " |")
    print("| bytes in range | | " + " | ".join(f"{n:,}" for _, n in carried[1]) + " |")


if __name__ == "__main__":
    main()
