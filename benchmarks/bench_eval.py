"""Evaluation speed: scoring the built-in corpus's whole held-out split, as `brt eval` does, against training speed
and against the reference's forward pass, in one run.

    python benchmarks/bench_eval.py                       # brt train's default model, random weights
    python benchmarks/bench_eval.py --checkpoint runs/brt  # a trained model (the scores then mean something)

Rows: one document at a time, documents side by side (``evaluate_corpus``'s lanes, ``--batch-size``) one block
per call (the default before blocks ran side by side) and in evaluation's default segments (a segment's blocks
side by side, ``model.forward_blocks``), float32 and bf16 autocast; tokens/s of a training step of the same model (forward +
backward + AdamW, as many rows of max_seq_len as ``brt train`` takes, float32 and bf16); and the reference package (0.4.4, from .venv-ref, as
reference_env.py creates it) scoring a sample of the same text by its wrapper's forward without gradients, segment
after segment (it has no streaming evaluation of its own). Speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from reference_env import reference_python

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference_forward_rate(config: dict, tokens: int, threads: int) -> float | None:
    """The reference's tokens/s scoring ``tokens`` tokens in max_seq_len segments (its own environment)."""
    python = reference_python(create=False)
    if python is None:
        return None
    reference_arguments = {k: config[k] for k in ("num_tokens", "dim", "depth", "dim_head", "heads", "max_seq_len",
                                                  "block_width", "num_state_vectors", "recurrent_layers")}
    code = f"""
import json, time, torch
torch.set_num_threads({threads})
from block_recurrent_transformer_pytorch import BlockRecurrentTransformer, RecurrentTrainerWrapper
config = json.loads('{json.dumps(reference_arguments)}')
config["recurrent_layers"] = tuple(config["recurrent_layers"])
model = BlockRecurrentTransformer(**config).eval()
wrapper = RecurrentTrainerWrapper(model).eval()
n = config["max_seq_len"]
seq = torch.randint(0, 256, (1, ({tokens} // n) * n + 1))
with torch.no_grad():
    wrapper(seq[:, : 2 * n + 1])
    start = time.perf_counter()
    wrapper(seq)
print(({tokens} // n) * n / (time.perf_counter() - start))
"""
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/")
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def training_rate(model, rows: int, bf16: bool) -> float:
    """Tokens/s of a training step of ``model`` on ``rows`` rows of max_seq_len (best of 3 after one warm-up)."""
    import torch

    from block_recurrent import RecurrentTrainerWrapper

    wrapper = RecurrentTrainerWrapper(model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = torch.randint(0, 256, (rows, model.config.max_seq_len + 1))
    best = float("inf")
    for step in range(4):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            wrapper.forward_backward(seq)
        optimizer.step()
        if step:
            best = min(best, time.perf_counter() - start)
    model.eval()
    return rows * model.config.max_seq_len / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained model (default: brt train's default preset, random weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--one-at-a-time-tokens", type=int, default=200_000,
                        help="the one-document-at-a-time row scores this many tokens (its rate is what counts)")
    args = parser.parse_args()

    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
    from block_recurrent.persistence.checkpoint import from_pretrained
    from block_recurrent.cli import DEFAULT_PRESET
    from block_recurrent.training.data import ByteTokenizer, TokenCorpus, builtin_documents, split_documents
    from block_recurrent.inference.evaluation import default_segment_len
    from block_recurrent.training.validation import evaluate_corpus

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        model, label = from_pretrained(args.checkpoint), args.checkpoint
    else:
        model, label = BlockRecurrentTransformer(BlockRecurrentConfig.from_name(DEFAULT_PRESET)).eval(), DEFAULT_PRESET
    held_out = TokenCorpus.from_documents(split_documents(builtin_documents())[1], ByteTokenizer())
    rows = []

    def timed(name: str, batch_size: int, bf16: bool, max_tokens: int | None = None, one_block: bool = False) -> None:
        segment_len = model.config.max_seq_len if one_block else None  # None: evaluation's default
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            scores = evaluate_corpus(model, held_out, max_tokens=max_tokens, batch_size=batch_size,
                                     segment_len=segment_len)
            seconds = time.perf_counter() - start
        rate = scores["tokens"] / seconds
        whole = held_out.token_count / rate
        rows.append((name, rate, whole, scores["bpb"], scores["tokens"]))
        print(f"  {name}: {rate:.0f} tok/s", file=sys.stderr, flush=True)

    started = time.perf_counter()
    W, segment = model.config.block_width, default_segment_len(model, 10**9)
    timed(f"one document at a time, segments of {segment}, bf16", 1, True, args.one_at_a_time_tokens)
    timed(f"{args.batch_size} documents side by side, max_seq_len ({model.config.max_seq_len}) per call, float32 "
          "(the default before blocks ran side by side)", args.batch_size, False, one_block=True)
    side = f"{args.batch_size} documents side by side, segments of {segment} ({segment // W} blocks side by side)"
    timed(f"{side}, float32", args.batch_size, False)
    timed(f"{side}, bf16 autocast (`brt eval`'s default here)", args.batch_size, True)
    from block_recurrent.training.train_config import TrainConfig

    train_rows = TrainConfig().batch_size
    train = training_rate(model, train_rows, False)
    train_bf16 = training_rate(model, train_rows, True)
    config = model.config.to_dict()
    reference = reference_forward_rate(config, 65536, args.threads)
    elapsed = time.perf_counter() - started

    print(f"model {label} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), held-out split "
          f"{held_out.token_count} tokens in {len(held_out)} files, torch {torch.__version__}, {args.threads} threads; "
          f"{elapsed:.0f} s in all\n")
    print("| scoring | tokens/s | whole split, s | vs training tok/s | bits per byte (tokens scored) |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, whole, bpb, tokens in rows:
        print(f"| {name} | {rate:.0f} | {whole:.0f} | {rate / train:.1f}x | {bpb:.4f} ({tokens}) |")
    print(f"| training step (forward + backward + AdamW), {train_rows} rows, float32 | {train:.0f} | | 1.0x | |")
    print(f"| training step, {train_rows} rows, bf16 autocast | {train_bf16:.0f} | | {train_bf16 / train:.1f}x | |")
    if reference is not None:
        print(f"| reference 0.4.4, wrapper forward without gradients, float32, 64 K tokens | {reference:.0f} "
              f"| {held_out.token_count / reference:.0f} | {reference / train:.1f}x | |")


if __name__ == "__main__":
    main()
