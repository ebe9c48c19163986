"""Does a trained model use its recurrent state? Held-out bits per byte with the state carried, and with it reset
to the learned initial state after every block (the XL memory is carried in both).

    python benchmarks/state_ablation.py --checkpoint runs/brt

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
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.persistence.checkpoint import from_pretrained  # noqa: E402
from block_recurrent.training.data import ByteTokenizer, TokenCorpus, builtin_documents, split_documents  # noqa: E402
from block_recurrent.training.distributed import native_bf16  # noqa: E402
from block_recurrent.inference.evaluation import curve_range, evaluate_documents, position_curve  # noqa: E402
from block_recurrent.model.state import ModelState  # noqa: E402

BUCKET = 1024
RANGES = [(0, 1), (1, 4), (4, 16), (16, 32), (32, None)]  # in buckets of 1 K


def score(model, docs, autocast) -> tuple[float, list[tuple[float, int]]]:
    """(bits per byte over everything, per range of positions (bits per byte, bytes))."""
    with autocast:
        results = evaluate_documents(model, docs, bucket_size=BUCKET)
    total = sum(r.loss_sum for r in results) / sum(r.tokens for r in results) / math.log(2)
    curve = position_curve(results)
    return total, [curve_range(curve, low * BUCKET, None if high is None else high * BUCKET) for low, high in RANGES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/brt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = from_pretrained(args.checkpoint).eval()
    held_out = TokenCorpus.from_documents(split_documents(builtin_documents())[1], ByteTokenizer())
    docs = [torch.from_numpy(held_out.document(i).astype("int64")) for i in range(len(held_out))]
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

    print(f"{args.checkpoint}: {len(docs)} held-out files, {held_out.token_count} bytes, "
          f"{time.perf_counter() - began:.0f} s\n")
    header = " | ".join(f"bytes {low}-{high} K" if high else f"bytes {low} K+" for low, high in RANGES)
    print(f"| state | whole split | {header} |")
    print("|---|---:|" + "---:|" * len(RANGES))
    for name, (total, ranges) in (("carried (as trained)", carried), ("reset after every block", reset)):
        print(f"| {name} | {total:.4f} | " + " | ".join(f"{bpb:.4f}" for bpb, _ in ranges) + " |")
    print("| bytes in range | | " + " | ".join(f"{n:,}" for _, n in carried[1]) + " |")


if __name__ == "__main__":
    main()
