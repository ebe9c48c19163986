"""Does a trained model use what it carries? Held-out bits per byte with the recurrent state and the XL memory
carried, and with one or both dropped after every block (block_recurrent.inference.diagnostics).

    python experiments/state_ablation.py --checkpoint runs/brt
    python experiments/state_ablation.py --checkpoint runs/long-docs/rec-8blocks-seed0 --documents package \
        --drop state memory

The record: docs/experiments/state-ablation.md, docs/experiments/2026-12-05-long-documents.md.

Scores every held-out document of the built-in corpus (files, or packages with ``--documents package``) from a
fresh state (``evaluate_ablated``, 16 side by side, bf16 autocast where native): as trained, then for each
``--drop``: "state" hands every block the learned initial state (the XL memory carried), "memory" invalidates every
memory slot (the state carried), "both" runs every block alone. Also by position in the document, in log-spaced
ranges to 1 MB: the state can only help where there is something before the attention window.
(Until 2026-12-05 this script swapped ``commit_block``, which left the writes between blocks that run side by side
in one call in place: its "reset" kept the state within evaluation segments of up to 1,024 tokens.)
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from block_recurrent.inference.diagnostics import DROPS, evaluate_ablated, format_curves, log_curve, whole
from block_recurrent.persistence.checkpoint import from_pretrained
from block_recurrent.training.data import ByteTokenizer, TokenCorpus
from block_recurrent.training.packages import source_documents, split_source
from block_recurrent.training.precision import native_bf16

NAMES = {None: "carried (as trained)", "state": "reset after every block", "memory": "memory dropped after every block",
         "both": "both dropped after every block"}


def held_out(data: str | None, documents: str) -> list[torch.Tensor]:
    docs = source_documents(data, documents=documents)
    corpus = TokenCorpus.from_documents(split_source(docs, documents)[1], ByteTokenizer())
    return [torch.from_numpy(corpus.document(i).astype("int64")) for i in range(len(corpus))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/brt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="a text file or folder instead of the built-in corpus")
    parser.add_argument("--documents", choices=("file", "package"), default="file")
    parser.add_argument("--drop", nargs="+", choices=DROPS, default=["state"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = from_pretrained(args.checkpoint).eval()
    docs = held_out(args.data, args.documents)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16(torch.device("cpu")) else nullcontext()

    began, rows = time.perf_counter(), {}
    for drop in [None, *args.drop]:
        with autocast:
            results = evaluate_ablated(model, docs, drop, bucket_size=1024)
        rows[NAMES[drop]] = (whole(results), log_curve(results))
    print(f"{args.checkpoint}: {len(docs)} held-out documents, {sum(len(d) for d in docs)} bytes, "
          f"{time.perf_counter() - began:.0f} s\n")
    print(format_curves(rows))


if __name__ == "__main__":
    main()
