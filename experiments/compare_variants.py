"""The paper's Table 1 in miniature: recurrent variants against Transformer-XL and sliding-window baselines.

    python experiments/compare_variants.py            # the recorded run (docs/experiments/variants-comparison.md)
    python experiments/compare_variants.py --quick    # 2 steps of everything: checks the plumbing, not the claim

Seven models of one tiny shape (width 64, 3 layers, 4 heads of 16) train with the same step budget and batch:

- Rec:fixed:skip        the default config (recurrence in layer 2, fixed gate, skip)
- Rec:lstm:skip         gate="lstm"
- Rec:fixed:dual        state_update="dual"
- Block-Feedback        state_feedback=True (every layer reads the state)
- Rec:fixed:skip T5+sliding  position_encoding="t5", attention_window="sliding" (the paper's positions and window)
- XL                    recurrent_layers=() (Transformer-XL: previous block cached, no state)
- Slide:4               recurrent_layers=(), attention_window="sliding", one extra layer (the paper's Slide:13)

on two tasks:

1. Recall (``block_recurrent.tasks.RecallTask``): a value token sits ``distance`` blocks before a query; the
   distance is beyond what any stack of the baselines' windows reaches, so they must stay at chance
   (1 / num_values) while a recurrent model can carry the value in its state. Scored on held-out rows.
2. The built-in corpus (the standard library's sources, bytes): documents streamed with the carried state, as
   ``brt train`` does (``block_recurrent.training.data``), scored in held-out bits per byte by streaming evaluation
   (``block_recurrent.training.validation.evaluate_corpus``), plus per-position loss over long held-out documents.

Prints a markdown table and writes the per-position plot (recurrent vs XL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer, RecurrentTrainerWrapper
from block_recurrent.inference.evaluation import evaluate
from block_recurrent.reference import convert
from block_recurrent.training.data import ByteTokenizer, DocumentStreams, TokenCorpus, load_documents, split_documents
from block_recurrent.training.validation import evaluate_corpus
from harness import RecallTask, adamw, map_units, parse_sets, train_recall, train_step

# the shared tiny shape; each variant is a set of config changes on top of it (depth: an added layer count)
BASE = dict(dim=64, depth=3, heads=4, dim_head=16, recurrent_layers=(2,))
VARIANTS: dict[str, dict] = {
    "Rec:fixed:skip": {},
    "Rec:lstm:skip": {"gate": "lstm"},
    "Rec:fixed:dual": {"state_update": "dual"},
    "Block-Feedback": {"state_feedback": True},
    "Rec:fixed:skip T5+sliding": {"position_encoding": "t5", "attention_window": "sliding"},
    "XL": {"recurrent_layers": ()},
    "Slide:4 (+1 layer)": {"recurrent_layers": (), "attention_window": "sliding", "extra_layers": 1},
}


@dataclass(frozen=True)
class Budget:
    # recall task
    recall_steps: int = 700
    recall_batch: int = 32
    recall_lr: float = 3e-3
    recall_block: int = 8
    recall_distance: int = 4  # blocks between value and query; >= depth + 2 keeps it beyond every baseline
    recall_values: int = 16
    recall_eval_rows: int = 1024
    recall_seeds: tuple[int, ...] = (0, 1, 2)
    # corpus
    corpus_steps: int = 800
    corpus_batch: int = 8
    corpus_lr: float = 3e-3
    corpus_block: int = 32
    corpus_segment: int = 128
    corpus_eval_tokens: int = 32768
    position_len: int = 4096  # held-out documents cut to this length for the per-position curve
    position_docs: int = 16
    position_bucket: int = 256


QUICK = Budget(recall_steps=2, recall_batch=8, recall_eval_rows=64, recall_seeds=(0,), corpus_steps=2, corpus_batch=2,
               corpus_eval_tokens=256, position_len=256, position_docs=2, position_bucket=64)


@dataclass
class VariantResult:
    name: str
    params: int  # all parameters of the corpus model (byte vocabulary)
    non_embedding: int
    recall_accuracy: list[float] = field(default_factory=list)  # one per seed
    recall_tokens_per_s: float = math.nan
    bpb: float = math.nan
    corpus_tokens_per_s: float = math.nan
    position_losses: list[tuple[int, float, int]] | None = None


def model_config(name: str, num_tokens: int, block: int, max_seq_len: int) -> BlockRecurrentConfig:
    changes = dict(VARIANTS[name])
    depth = BASE["depth"] + changes.pop("extra_layers", 0)
    return BlockRecurrentConfig(**{**BASE, **changes, "depth": depth}, num_tokens=num_tokens, block_width=block,
                                max_seq_len=max_seq_len, num_state_vectors=block)


def non_embedding(model: BlockRecurrentTransformer) -> int:
    return model.num_parameters(non_embedding=True)  # the layer stack, as the paper counts


def recall(name: str, budget: Budget, seed: int) -> tuple[float, float]:
    """(held-out accuracy, training tokens/s) of one variant on the recall task."""
    task = RecallTask(block_width=budget.recall_block, distance=budget.recall_distance, num_values=budget.recall_values)
    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(model_config(name, task.vocab_size, task.block_width, task.length))
    score = train_recall(model, task, seed=seed, steps=budget.recall_steps, batch=budget.recall_batch,
                         lr=budget.recall_lr, eval_rows=budget.recall_eval_rows)  # same rows for every variant
    return score.accuracy, score.tokens_per_s


def long_documents(corpus: TokenCorpus, length: int, count: int) -> torch.Tensor | None:
    """(count', length): the first ``length`` tokens of up to ``count`` documents at least that long."""
    docs = [corpus.document(i)[:length] for i in range(len(corpus)) if len(corpus.document(i)) >= length]
    if not docs:
        return None
    return torch.stack([torch.from_numpy(d.astype("int64")) for d in docs[:count]])


def train_corpus(name: str, budget: Budget, train: TokenCorpus, val: TokenCorpus, seed: int = 0) -> tuple[float, float, int, int, list | None]:
    """(held-out bpb, training tokens/s, params, non-embedding params, per-position losses) on the corpus."""
    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(model_config(name, 256, budget.corpus_block, budget.corpus_segment))
    wrapper, optimizer = RecurrentTrainerWrapper(model), adamw(model, budget.corpus_lr)
    streams = DocumentStreams(train, budget.corpus_batch, seed=seed)  # same documents for every variant
    state, tokens = None, 0
    began = time.perf_counter()
    for _ in range(budget.corpus_steps):
        batch = streams.next_batch(budget.corpus_segment)
        state = train_step(wrapper, optimizer, batch.inputs, batch.labels, state=state, reset=batch.reset).state
        tokens += batch.inputs.numel()
    seconds = time.perf_counter() - began
    scores = evaluate_corpus(model, val, max_tokens=budget.corpus_eval_tokens)
    docs = long_documents(val, budget.position_len, budget.position_docs)
    buckets = None if docs is None else evaluate(model, docs, bucket_size=budget.position_bucket).bucket_losses
    params = sum(p.numel() for p in model.parameters())
    return scores["bpb"], tokens / seconds, params, non_embedding(model), buckets


_CORPORA: dict[str, tuple[TokenCorpus, TokenCorpus]] = {}  # read once; forked workers inherit it
_THREADS = [1]  # torch threads per worker (set by main)


def _work(unit: tuple[str, str, Budget, str | None, int]):
    """One independent unit: ("corpus", name, budget, data, seed) or ("recall", name, budget, data, seed)."""
    task, name, budget, data, seed = unit
    torch.set_num_threads(_THREADS[0])
    if task == "corpus":
        return train_corpus(name, budget, *_CORPORA[str(data)], seed=seed)
    return recall(name, budget, seed)


def run(budget: Budget, data: str | None = None, names: list[str] | None = None, log=print,
        jobs: int = 1, corpus_seed: int = 0) -> list[VariantResult]:
    """Train every variant on both tasks; ``jobs`` > 1 runs independent units in forked worker processes."""
    names = list(VARIANTS) if names is None else names
    train_docs, val_docs = split_documents(load_documents(data))
    train, val = (TokenCorpus.from_documents(d, ByteTokenizer()) for d in (train_docs, val_docs))
    _CORPORA[str(data)] = (train, val)
    log(f"corpus: {train.token_count:,} training bytes, {val.token_count:,} held-out bytes in {len(val)} documents")
    units = [("corpus", name, budget, data, corpus_seed) for name in names]
    units += [("recall", name, budget, data, seed) for name in names for seed in budget.recall_seeds]
    outputs = map_units(_work, units, jobs)
    done = dict(zip([(u[0], u[1], u[4]) for u in units], outputs))

    results = []
    for name in names:
        bpb, tps, params, non_emb, buckets = done["corpus", name, corpus_seed]
        result = VariantResult(name, params, non_emb, bpb=bpb, corpus_tokens_per_s=tps, position_losses=buckets)
        log(f"{name}: corpus bpb {bpb:.3f}, {tps:.0f} tokens/s")
        recall = [done["recall", name, seed] for seed in budget.recall_seeds]
        result.recall_accuracy = [accuracy for accuracy, _ in recall]
        if recall:
            result.recall_tokens_per_s = sum(tps for _, tps in recall) / len(recall)
            log(f"{name}: recall accuracy per seed {result.recall_accuracy}")
        results.append(result)
    return results


MELIAD_COUNTS = {"baseline (12 layers)": 151_022_688, "Rec:fixed:skip": 160_461_944}  # from the issue
# the reference port's architecture at the paper's shape, for comparison (the preset normalises every layer's
# attention; the reference's default does so only in recurrent layers)
REFERENCE_ARCHITECTURE = {**convert.REFERENCE_ARCHITECTURE, "all_layers_qk_rmsnorm": False}


def paper_parameter_counts() -> str:
    """Non-embedding parameters of the 'paper' preset with and without recurrence, against meliad's counts."""
    lines = ["| 12 layers, width 1024 | `paper` preset (meliad's architecture) | meliad | reference's architecture |",
             "|---|---|---|---|"]
    for label, recurrent in (("baseline (12 layers)", ()), ("Rec:fixed:skip", (10,))):
        counts = []
        for changes in ({}, REFERENCE_ARCHITECTURE):
            with torch.device("meta"):  # shapes only: no memory, no time
                config = BlockRecurrentConfig.from_name("paper", recurrent_layers=recurrent, **changes)
                counts.append(non_embedding(BlockRecurrentTransformer(config)))
        lines.append(f"| {label} | {counts[0]:,} | {MELIAD_COUNTS[label]:,} | {counts[1]:,} |")
    return "\n".join(lines)


def build_table(results: list[VariantResult], budget: Budget) -> str:
    """The markdown results table."""
    chance = 1 / budget.recall_values
    lines = [
        f"| model | params (non-emb.) | recall acc. per seed (chance {chance:.3f}) | recall tokens/s "
        f"| held-out bpb | corpus tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        seeds = ", ".join(f"{a:.3f}" for a in r.recall_accuracy) or "-"
        recall_tps = "-" if math.isnan(r.recall_tokens_per_s) else f"{r.recall_tokens_per_s:,.0f}"
        lines.append(f"| {r.name} | {r.params:,} ({r.non_embedding:,}) | {seeds} | {recall_tps} "
                     f"| {r.bpb:.3f} | {r.corpus_tokens_per_s:,.0f} |")
    return "\n".join(lines)


def plot_positions(results: list[VariantResult], path: Path, budget: Budget) -> bool:
    """Per-position held-out loss (bits per byte), recurrent (fixed and LSTM gates, feedback) vs XL; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in results if r.name in ("Rec:fixed:skip", "Rec:lstm:skip", "Block-Feedback", "XL") and r.position_losses]
    xl = next((r for r in shown if r.name == "XL"), None)
    fig, axes = plt.subplots(2 if xl else 1, 1, figsize=(7, 7 if xl else 4), sharex=True, squeeze=False)
    bits = lambda r: [loss / math.log(2) for _, loss, _ in r.position_losses]
    for r in shown:
        starts = [s + budget.position_bucket / 2 for s, _, _ in r.position_losses]
        axes[0, 0].plot(starts, bits(r), marker="o", label=r.name)
        if xl and r is not xl:  # below zero: better than XL at that position
            axes[1, 0].plot(starts, [a - b for a, b in zip(bits(r), bits(xl))], marker="o", label=r.name)
    axes[0, 0].set_ylabel("held-out loss (bits per byte)")
    axes[0, 0].set_title(f"Per-position loss, first {budget.position_len} bytes of held-out files")
    axes[0, 0].legend()
    if xl:
        axes[1, 0].axhline(0.0, color="gray", linewidth=1)
        axes[1, 0].set_ylabel("minus XL's loss (bits per byte)")
        axes[1, 0].legend()
    axes[-1, 0].set_xlabel(f"position in document (bytes; buckets of {budget.position_bucket})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-only", action="store_true", help="only the paper preset's parameter counts")
    parser.add_argument("--quick", action="store_true", help="2 steps of everything (a plumbing check)")
    parser.add_argument("--data", default=None, help="a text file or folder instead of the built-in corpus")
    parser.add_argument("--plot", default="docs/experiments/variants_position_loss.png")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--replot", default=None, help="only redraw the plot from a --json file of a full run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: the machine is shared)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the independent runs")
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=None, help="a subset of the models")
    parser.add_argument("--corpus-steps", type=int, default=None, help="override the corpus training steps")
    parser.add_argument("--recall-seeds", type=int, default=None, help="override the number of recall seeds (0: no recall)")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of the corpus runs' weights and data order")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="a config field for every model, e.g. all_layers_qk_rmsnorm=true (repeatable)")
    args = parser.parse_args(argv)
    BASE.update(parse_sets(args.set))
    if args.set:
        print(f"every model also gets: {', '.join(args.set)}\n")
    torch.set_num_threads(args.threads)
    _THREADS[0] = args.threads
    print(paper_parameter_counts() + "\n")
    if args.params_only:
        return
    budget = QUICK if args.quick else Budget()
    if args.corpus_steps is not None:
        budget = dataclasses.replace(budget, corpus_steps=args.corpus_steps)
    if args.recall_seeds is not None:
        budget = dataclasses.replace(budget, recall_seeds=tuple(range(args.recall_seeds)))
    if args.replot:
        saved = [VariantResult(**r) for r in json.loads(Path(args.replot).read_text())]
        plot_positions(saved, Path(args.plot), budget)
        return
    began = time.time()
    results = run(budget, args.data, names=args.models, corpus_seed=args.corpus_seed, log=lambda text: print(text, file=sys.stderr, flush=True),
                  jobs=args.jobs)
    print(build_table(results, budget))
    if args.plot and plot_positions(results, Path(args.plot), budget):
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    print(f"wall time: {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
