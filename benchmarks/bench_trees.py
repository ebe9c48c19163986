"""Two source trees of this library side by side (e.g. before and after a change): training and decoding speed.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_trees.py /tmp/before .            # labels: the paths
    python benchmarks/bench_trees.py /tmp/before . --rounds 5

Each measurement runs in a fresh process that imports ``block_recurrent`` from its tree; the trees alternate
round by round (A B A B ...), so slow drift of the machine hits both alike, and the table reports each tree's
median over rounds. Training: the small config (the README's training table), batch 4 x 4 segments x 256
tokens, forward + backward + AdamW step, 2 threads, tokens/s of the best of 3 steps. Decoding: the same model,
batch 1, 16-token prompt, greedy, 512 new tokens, 1 thread, tokens/s, eager and compiled (``compile=True``, after
a warm-up that compiles). Evaluation: ``evaluate`` over 4 documents x 4,097 tokens, 2 threads. All in the
reference's architecture (``gate_projection=True``), as the other benchmarks, through the names both trees export
at the top of the package. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SMALL = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, block_width=128, max_seq_len=256,
             num_state_vectors=128, recurrent_layers=(2,), gate_projection=True)


def worker(tree: str, what: str) -> dict:
    sys.path.insert(0, tree)
    import torch

    import block_recurrent
    from block_recurrent import BlockRecurrentTransformer, RecurrentTrainerWrapper

    assert block_recurrent.__file__.startswith(tree), block_recurrent.__file__
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(**SMALL)
    if what == "train":
        torch.set_num_threads(2)
        wrapper = RecurrentTrainerWrapper(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seq = torch.randint(0, 256, (4, 4 * 256 + 1))
        best = float("inf")
        for step in range(4):  # one warm-up step, then the best of three
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            wrapper.forward_backward(seq)
            optimizer.step()
            if step:
                best = min(best, time.perf_counter() - start)
        return {"tokens_per_s": 4 * 4 * 256 / best}
    if what == "eval":
        torch.set_num_threads(2)
        from block_recurrent import evaluate

        documents = torch.randint(0, 256, (4, 4097))
        evaluate(model, documents[:, :257])  # warm-up
        start = time.perf_counter()
        evaluate(model, documents)
        return {"tokens_per_s": documents.numel() / (time.perf_counter() - start)}
    torch.set_num_threads(1)
    from block_recurrent import generate

    compile = what == "compiled"
    model.eval()
    prompt = torch.randint(0, 256, (1, 16))
    generate(model, prompt, 32, temperature=0, compile=compile)  # warm-up (compiles)
    start = time.perf_counter()
    generate(model, prompt, 512, temperature=0, compile=compile)
    return {"tokens_per_s": 512 / (time.perf_counter() - start)}


MEASURES = {
    "train": "training, small, 4 x 4 x 256, 2 threads",
    "decode": "eager decoding, batch 1, 1 thread",
    "compiled": "compiled decoding, batch 1, 1 thread",
    "eval": "evaluation, 4 x 4,097 tokens, 2 threads",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="two source trees (folders holding block_recurrent/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    from pathlib import Path

    if len(args.trees) != 2:
        parser.error("give two source trees")
    trees = [str(Path(tree).resolve()) for tree in args.trees]
    results = {(tree, what): [] for tree in trees for what in MEASURES}
    started = time.perf_counter()
    for round_ in range(args.rounds):
        for what in MEASURES:
            for tree in trees:
                out = subprocess.run([sys.executable, __file__, "--worker", tree, what], check=True,
                                     capture_output=True, text=True, cwd="/")
                results[(tree, what)].append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])
                print(f"round {round_ + 1} {what} {tree}: {results[(tree, what)][-1]:.0f} tokens/s", file=sys.stderr,
                      flush=True)  # a long run shows its progress, and an interrupted one what it had
    print(f"{args.rounds} rounds in {time.perf_counter() - started:.0f} s; median tokens/s (each round's value)\n")
    print(f"| what | {args.trees[0]} | {args.trees[1]} | ratio |")
    print("|---|---:|---:|---:|")
    for what, label in MEASURES.items():
        a, b = (statistics.median(results[(tree, what)]) for tree in trees)
        runs = lambda tree: ", ".join(f"{v:.0f}" for v in results[(tree, what)])
        print(f"| {label} | {a:.0f} ({runs(trees[0])}) | {b:.0f} ({runs(trees[1])}) | {b / a:.3f}x |")


if __name__ == "__main__":
    main()
