"""The sweep behind `brt train`'s defaults: held-out bits per byte of candidate recipes on the built-in corpus.

    python experiments/default_recipe.py --jobs 2                 # every candidate, seed 0, two at a time
    python experiments/default_recipe.py --only w128d4 --seeds 0 1 2

The record: docs/experiments/default-recipe.md, hour-recipe.md and rec-xl-slide.md.

Each candidate is a model config and training settings with a step count chosen so that training takes about
the same wall-clock time on two idle cores (``seconds_per_step`` measured there, bf16 autocast). Runs go through
the library's own trainer (``block_recurrent.training.trainer.train``); each is then scored on the whole held-out split
(96 files, 1.41 M bytes) with ``evaluate_corpus`` and compared with gzip -9 on the same files, one by one.
With ``--jobs 2`` two runs share the machine, one thread each: step counts are fixed, so results do not depend
on the sharing; only the printed wall-clock does. Prints a markdown table and writes runs/recipes/results.jsonl.
``--data`` and ``--max-steps`` (another corpus, fewer steps) are for checking the script, not for the record.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from harness import held_out_documents, map_units

ROOT = Path(__file__).resolve().parents[1]

# the per-position curve: bits per byte per bucket of this many positions, up to this far into a file
POSITION_BUCKET, POSITION_LIMIT = 1024, 32768

BYTE_MODEL = dict(num_tokens=256, heads=4, all_layers_qk_rmsnorm=True)


def candidate(steps: int, *, dim: int = 128, depth: int = 4, dim_head: int = 32, recurrent_layers=(2,),
              segment: int = 128, block: int = 64, states: int | None = None, temperature: float | None = 4.0,
              rows: int = 16, lr: float = 3e-3, replay_write: bool = False, state_lr_scale: float = 1.0,
              **model_fields) -> dict:
    """A recipe: the model (blocks of ``block``, segments of ``segment`` tokens, ``states`` state vectors,
    default one per block token; ``temperature`` None keeps the config's default of 1; any other
    ``BlockRecurrentConfig`` field as a keyword) and ``rows`` x ``segment`` tokens per step for ``steps`` steps.
    ``replay_write``, ``state_lr_scale``: the trainer's settings, as the candidates measured before they existed
    ran (no replay, every parameter at lr)."""
    model = dict(dim=dim, depth=depth, dim_head=dim_head, max_seq_len=segment, block_width=block,
                 num_state_vectors=block if states is None else states, recurrent_layers=recurrent_layers,
                 **model_fields)
    if temperature is not None:
        model["qk_rmsnorm_scale"] = temperature
    train = dict(batch_size=rows, lr=lr, replay_write=replay_write, state_lr_scale=state_lr_scale)
    return dict(model=model, train=train, steps=steps)


CANDIDATES = {
    # first round, 16 rows x 128 tokens: the probe (temperature 1), temperature, lr, size
    "w128d4": candidate(1100, temperature=None),
    "w128d4-t4": candidate(1100),
    "w128d4-t4-lr6": candidate(1100, lr=6e-3),
    "w128d4-t8": candidate(1100, temperature=8.0),
    "w192d4": candidate(790, dim=192, dim_head=48, temperature=None),
    "w128d6": candidate(790, depth=6, recurrent_layers=(3,), temperature=None),
    # the first chosen default (1,000 steps of 16 x 128; the mini preset before blocks of 16)
    "mini-b64": candidate(1000),
    # the chosen default: the mini preset and TrainConfig's defaults, exactly what `brt train` runs
    "mini": candidate(1500, segment=16, block=16, rows=128),
    # second round, the same 2,048 bytes per step cut differently: longer attention context with fewer rows...
    "b128": candidate(1000, segment=256, block=128, states=64, rows=8),
    "b256": candidate(1000, segment=256, block=256, states=64, rows=8),
    "b128x16": candidate(550, segment=256, block=128, states=64, rows=16),
    # ...or more document streams per step, one block per segment
    "r32": candidate(1200, segment=64, rows=32),
    "r64b32": candidate(1050, segment=32, block=32, rows=64),
    "r64b32-lr5": candidate(1050, segment=32, block=32, rows=64, lr=5e-3),
    "r128b16": candidate(1000, segment=16, block=16, rows=128),
    "r128b16-1500": candidate(1500, segment=16, block=16, rows=128),
    "r256b16": candidate(555, segment=16, block=16, rows=256),
    # the one-hour recipe's shape (width 192, blocks of 32, 128 rows): its 20-minute version as Rec, and the same
    # model without recurrence as Transformer-XL (previous block cached) and as the sliding-window baseline (a
    # window of exactly one block, one more layer: the paper's Slide:13 against 12 layers), at equal steps
    "rec20": candidate(3800, dim=192, dim_head=48, segment=32, block=32, states=16, rows=128),
    "xl20": candidate(3800, dim=192, dim_head=48, segment=32, block=32, states=16, rows=128, recurrent_layers=()),
    "slide20": candidate(3800, dim=192, depth=5, dim_head=48, segment=32, block=32, states=16, rows=128,
                         recurrent_layers=(), attention_window="sliding"),
    # the same with segments of two blocks (64 rows of 64 bytes, the same bytes per step): with segments of one
    # block the state written at a block's end is only read in the next step, after the carry is detached, so
    # the state's write path (its attention, update projection and gate) gets no gradient at all
    "rec20-2blocks": candidate(3800, dim=192, dim_head=48, segment=64, block=32, states=16, rows=64),
    "xl20-2blocks": candidate(3800, dim=192, dim_head=48, segment=64, block=32, states=16, rows=64,
                              recurrent_layers=()),
    "slide20-2blocks": candidate(3800, dim=192, depth=5, dim_head=48, segment=64, block=32, states=16, rows=64,
                                 recurrent_layers=(), attention_window="sliding"),
    "hour": candidate(9000, dim=192, dim_head=48, segment=32, block=32, states=16, rows=128),
    # the default with segments of two blocks (64 rows of 32 bytes): the state's write path trained
    "mini-2blocks": candidate(1500, segment=32, block=16, states=16, rows=64),
    # more steps of the default, in the time the command had left under five minutes (3 min 45 s for 1,500)
    "mini-1800": candidate(1800, segment=16, block=16, rows=128),
    "mini-2000": candidate(2000, segment=16, block=16, rows=128),
    # two blocks per segment (the write trained) with the LSTM gate, its forget offset at +3
    # (docs/experiments/recall-distance.md)
    "mini-2blocks-lstm3": candidate(1500, segment=32, block=16, states=16, rows=64, gate="lstm", gate_keep_init=3.0),
    # segments of one block with the state's write replayed in the next step, so that it trains
    "mini-1800-replay": candidate(1800, segment=16, block=16, rows=128, replay_write=True),
    # ...with the state cells at 0.1x the learning rate, with the fixed gate and with the LSTM gate at +3 (the setting
    # that learns recall 8 blocks back; docs/experiments/slow-state-cells.md)
    "mini-1800-replay-cell01": candidate(1800, segment=16, block=16, rows=128, replay_write=True, state_lr_scale=0.1),
    "mini-1800-replay-lstm3-cell01": candidate(1800, segment=16, block=16, rows=128, replay_write=True,
                                               state_lr_scale=0.1, gate="lstm", gate_keep_init=3.0),
    # the hour recipe's shape as brt train's defaults now train it: the write replayed, slow state cells, LSTM gate +3
    "rec20-lstm3-cell01": candidate(3800, dim=192, dim_head=48, segment=32, block=32, states=16, rows=128,
                                    replay_write=True, state_lr_scale=0.1, gate="lstm", gate_keep_init=3.0),
    # the old default (small preset, 8 x 256 tokens, lr 2e-3, 300 steps)
    "small-old": dict(model=dict(dim=256, depth=4, dim_head=64, max_seq_len=256, block_width=128, num_state_vectors=128,
                                 recurrent_layers=(2,), all_layers_qk_rmsnorm=False), train=dict(batch_size=8, lr=2e-3),
                      steps=300),
}


def run(unit: tuple[str, int, int, str, str | None, int | None]) -> dict:
    """Train one candidate with one seed, score it on the held-out split; (name, seed, threads, out folder, data,
    steps: None for the candidate's own)."""
    name, seed, threads, out, data, steps = unit
    import torch

    from block_recurrent import BlockRecurrentConfig
    from block_recurrent.inference.evaluation import evaluate_documents, position_curve
    from block_recurrent.persistence.checkpoint import from_pretrained
    from block_recurrent.training.precision import resolve_eval_bf16
    from block_recurrent.training.trainer import TrainConfig, train

    torch.set_num_threads(threads)
    spec = CANDIDATES[name]
    model_config = BlockRecurrentConfig(**{**BYTE_MODEL, **spec["model"]})
    run_dir = Path(out) / f"{name}-seed{seed}"
    config = TrainConfig(**{**spec["train"], "max_steps": steps or spec["steps"], "warmup_steps": 30, "seed": seed,
                            "bf16": True, "out_dir": str(run_dir), "eval_every": 0, "checkpoint_every": 0,
                            "sample_tokens": 0, "progress": False, "keep_last": 1, "data": data,
                            "final_eval": False})  # scored below, with the per-position curve
    started = time.perf_counter()
    last = train(model_config, config)
    trained = time.perf_counter() - started
    model = from_pretrained(run_dir)
    documents = held_out_documents(data)
    started = time.perf_counter()
    bf16 = resolve_eval_bf16(None, torch.device("cpu"), model.config.block_width, model.blocks_side_by_side)  # brt eval's
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        results = evaluate_documents(model, documents, bucket_size=POSITION_BUCKET)
    loss_sum, tokens = sum(r.loss_sum for r in results), sum(r.tokens for r in results)
    # bits per byte by position in the file, every file pooled, up to POSITION_LIMIT
    curve = [point for point in position_curve(results) if point[0] < POSITION_LIMIT]
    # the steps taken (a run stopped by a signal saves and ends early), not the ones planned
    return {"name": name, "seed": seed, "steps": last["step"], "threads": threads, "train_s": round(trained, 1),
            "eval_s": round(time.perf_counter() - started, 1), "eval_bf16": bf16, "train_bpb": last.get("bpb"),
            "held_out_bpb": loss_sum / tokens / math.log(2), "parameters": sum(p.numel() for p in model.parameters()),
            "positions": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (1: two threads)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "recipes"))
    parser.add_argument("--data", default=None, help="a text file or folder instead of the built-in corpus")
    parser.add_argument("--max-steps", type=int, default=None, help="instead of each candidate's step count")
    args = parser.parse_args(argv)

    jobs = [(name, seed, 1 if args.jobs > 1 else 2, args.out, args.data, args.max_steps)
            for name in args.only for seed in args.seeds]
    started = time.perf_counter()
    results = map_units(run, jobs, args.jobs, start="spawn")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "results.jsonl", "a") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    from block_recurrent.training.data import gzip_bits_per_byte, load_documents, split_documents

    held_out = split_documents(load_documents(args.data))[1]
    print(f"{len(jobs)} runs in {time.perf_counter() - started:.0f} s; gzip -9 per file: {gzip_bits_per_byte(held_out):.3f} "
          "bits per byte on the same held-out files\n")
    print("| candidate | seed | steps | parameters | train s | eval s | held-out bits per byte |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['seed']} | {r['steps']} | {r['parameters'] / 1e6:.2f} M | {r['train_s']} | "
              f"{r['eval_s']} | {r['held_out_bpb']:.3f} |")


if __name__ == "__main__":
    main()
